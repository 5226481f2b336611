"""A version is loaded and scored the way a replica would, before it may be deployed."""

import pytest

from mlplatform.serving.preflight import UnservableModel, preflight, synthesized_records
from mlplatform_tests.support import register_copy, train_champion


@pytest.fixture
def champion(platform_home) -> str:
    """A trained champion (v1) in the test's platform home; returns its tracking URI."""
    platform_home.mkdir(parents=True, exist_ok=True)
    settings, _ = train_champion(platform_home, seed=5)
    return settings.tracking_uri


def test_a_loadable_version_scores_synthesized_records(champion):
    served = preflight("models:/mlplatform/1", champion)
    assert served.version == "1"
    typical, missing = synthesized_records(served.spec)
    assert set(typical) == set(missing) == set(served.spec.features)
    assert typical["purpose"] == served.spec.categories["purpose"][0]
    assert typical["age"] == 0.0 and typical["has_cosigner"] is False
    assert set(missing.values()) == {None}
    fields = served.response_fields(served.predict([typical, missing]))
    assert len(fields["predictions"]) == 2
    assert all(0.0 <= p <= 1.0 for p in fields["probabilities"])


def test_a_corrupt_artifact_is_named_before_any_replica_sees_it(champion, tmp_path):
    broken = register_copy("1", tmp_path / "copy", corrupt=True)
    with pytest.raises(UnservableModel) as raised:
        preflight(f"models:/mlplatform/{broken}", champion)
    message = str(raised.value)
    assert message.startswith(f"models:/mlplatform/{broken} cannot be loaded: UnpicklingError")
    assert "invalid load key" in message
    # A faithful copy of the same files serves.
    assert preflight(f"models:/mlplatform/{register_copy('1', tmp_path / 'good')}", champion)
