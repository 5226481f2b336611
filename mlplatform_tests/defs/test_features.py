import dagster as dg
import numpy as np
import pandas as pd

from mlplatform.defs.features import (
    FeaturesConfig,
    check_dominant_feature,
    check_leakage,
    check_split,
    features,
    reference_profile,
)
from mlplatform.defs.ingest import data_version, raw_data
from mlplatform.demo.data import generate_loans
from mlplatform.model.dataset import FeatureSet, split_frame
from mlplatform.model.spec import infer_feature_spec
from mlplatform.monitoring.profiles import profile_frame
from mlplatform.resources import DataSource


def _feature_set(frame: pd.DataFrame) -> FeatureSet:
    spec = infer_feature_spec(frame, "defaulted")
    train, valid, test = split_frame(frame, spec, FeaturesConfig())
    return FeatureSet(spec, train, valid, test, data_version(frame), spec.time_column is not None)


def test_time_ordered_split_puts_the_newest_rows_in_test():
    frame = generate_loans(1000).sample(frac=1, random_state=0)  # shuffled input
    feature_set = _feature_set(frame)
    assert (len(feature_set.train), len(feature_set.valid), len(feature_set.test)) == (
        700,
        150,
        150,
    )
    assert (
        feature_set.train["application_date"].max() <= feature_set.valid["application_date"].min()
    )
    assert feature_set.valid["application_date"].max() <= feature_set.test["application_date"].min()
    assert check_split(feature_set).passed


def test_random_split_is_stratified_and_seeded():
    frame = generate_loans(1000).drop(columns=["application_date"])
    first, second = _feature_set(frame), _feature_set(frame)
    assert not first.time_ordered
    pd.testing.assert_frame_equal(first.test, second.test)
    rates = [first.labels(split).mean() for split in ("train", "valid", "test")]
    assert max(rates) - min(rates) < 0.02


def test_split_check_fails_when_a_split_has_one_class():
    feature_set = _feature_set(generate_loans(1000))
    test = feature_set.test.assign(defaulted=0)
    broken = FeatureSet(feature_set.spec, feature_set.train, feature_set.valid, test, "v", True)
    result = check_split(broken)
    assert not result.passed
    assert "test has a single class" in result.description


def test_leakage_check_blocks_a_recoded_label_and_an_identifier_that_encodes_it():
    frame = generate_loans(1000)
    frame["collections_flag"] = frame["defaulted"].map({0: "clean", 1: "sent"})
    # An account number issued from a different range once the loan defaulted.
    frame["account"] = frame["defaulted"] * 100_000 + frame.index.to_numpy() % 5_000
    result = check_leakage(_feature_set(frame), exactness=0.999)
    assert not result.passed
    assert "collections_flag reproduces the target (accuracy 1.0000)" in result.description
    assert "account reproduces the target (accuracy 1.0000)" in result.description
    assert "Remove these columns" in result.description
    clean = check_leakage(_feature_set(generate_loans(1000)), exactness=0.999)
    assert clean.passed and clean.description.startswith("no feature reproduces the target")


def test_a_strong_feature_is_a_warning_with_its_numbers_never_a_block():
    """Like petal length in iris: it separates the classes well, but it is a real measurement."""
    frame = generate_loans(1000)
    rng = np.random.default_rng(0)
    frame["bureau_score"] = frame["defaulted"] * 3.0 + rng.normal(0, 0.5, len(frame))
    feature_set = _feature_set(frame)
    assert check_leakage(feature_set, exactness=0.999).passed
    warning = check_dominant_feature(feature_set, max_auc=0.98)
    assert not warning.passed and warning.severity == dg.AssetCheckSeverity.WARN
    assert warning.description.startswith("POSSIBLE TARGET LEAKAGE: bureau_score alone ranks")
    assert 0.98 <= warning.metadata["single_feature_auc"].value["bureau_score"] < 1


def test_leakage_check_on_a_regression_target_blocks_only_a_monotone_copy():
    frame = generate_loans(1000)
    frame["defaulted"] = frame["loan_amount"] * 0.8 + frame["income"].fillna(0) * 0.1
    frame["amount_in_cents"] = frame["defaulted"] * 100  # the target under another name
    result = check_leakage(_feature_set(frame), exactness=0.999)
    assert not result.passed and "amount_in_cents" in result.description
    assert "loan_amount" not in result.description  # strongly related, not a copy


def test_profile_covers_features_and_target():
    feature_set = _feature_set(generate_loans(500))
    view = profile_frame(feature_set.train, feature_set.spec)
    assert set(view.get_columns()) == set(feature_set.spec.features) | {"defaulted"}
    assert view.get_column("age").get_metric("counts").n.value == len(feature_set.train)


def test_materialize_features_and_reference_profile(small_loans_csv, platform_home):
    result = dg.materialize(
        [raw_data, features, reference_profile],
        resources={"data_source": DataSource(uri=str(small_loans_csv), target="defaulted")},
    )
    assert result.success
    feature_set = result.output_for_node("features")
    assert len(feature_set.train) + len(feature_set.valid) + len(feature_set.test) == 1200
    assert "application_id" in feature_set.spec.dropped
    profile_path = result.output_for_node("reference_profile")
    assert profile_path.startswith(str(platform_home / "profiles" / "reference"))
    assert {c.check_name for c in result.get_asset_check_evaluations() if c.passed} >= {
        "split_sanity",
        "no_target_leakage",
    }
