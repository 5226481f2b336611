import sqlite3
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mlplatform.model.registry import RegistryUnavailable, version_by_alias
from mlplatform_tests.support import free_port, report_figure


@pytest.fixture
def store(tmp_path: Path) -> tuple[MlflowClient, Path]:
    """A real SQLite registry with model ``m`` and one version, without aliases."""
    database = tmp_path / "registry.db"
    uri = f"sqlite:///{database}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path / "artifacts"))
    return client, database


def test_missing_model_or_alias_is_none_and_a_set_alias_is_its_version(store):
    client, _ = store
    assert version_by_alias(client, "no-such-model", "champion") is None
    assert version_by_alias(client, "m", "champion") is None
    client.set_registered_model_alias("m", "champion", "1")
    assert str(version_by_alias(client, "m", "champion").version) == "1"


@pytest.mark.faults
def test_a_locked_store_is_retried_then_reported_never_read_as_no_alias(store, record_property):
    client, database = store
    client.set_registered_model_alias("m", "champion", "1")
    writer = sqlite3.connect(database, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")  # another process holds the store
    started = time.monotonic()
    try:
        with pytest.raises(
            RegistryUnavailable, match=r"did not answer for m@champion after 2 tries"
        ):
            version_by_alias(client, "m", "champion", attempts=2, backoff_s=0.1)
    finally:
        reported_s = time.monotonic() - started
        writer.execute("ROLLBACK")
        writer.close()
    assert str(version_by_alias(client, "m", "champion").version) == "1"
    report_figure(record_property, "registry_locked", tries=2, reported_after_s=f"{reported_s:.1f}")


@pytest.mark.faults
def test_an_unreachable_server_is_reported_after_bounded_retries(monkeypatch, record_property):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="after 3 tries") as raised:
        version_by_alias(client, "m", "champion", attempts=3, backoff_s=0.2)
    reported_s = time.monotonic() - started
    assert isinstance(raised.value.__cause__, mlflow.exceptions.MlflowException)
    report_figure(
        record_property, "registry_unreachable", tries=3, reported_after_s=f"{reported_s:.1f}"
    )


def test_attempts_must_be_positive(store):
    client, _ = store
    with pytest.raises(ValueError, match="at least 1"):
        version_by_alias(client, "m", "champion", attempts=0)
