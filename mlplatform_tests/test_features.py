import dagster as dg
import pandas as pd

from mlplatform.defs.features import (
    FeaturesConfig,
    FeatureSet,
    check_leakage,
    check_split,
    features,
    profile_frame,
    reference_profile,
    split_frame,
)
from mlplatform.defs.ingest import data_version, raw_data
from mlplatform.demo.data import generate_loans
from mlplatform.resources import DataSource
from mlplatform.tabular import infer_feature_spec


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


def test_leakage_check_catches_a_copied_label():
    frame = generate_loans(1000)
    frame["collections_flag"] = frame["defaulted"].map({0: "clean", 1: "sent"})
    result = check_leakage(_feature_set(frame), max_auc=0.98)
    assert not result.passed
    assert "collections_flag" in result.description
    assert check_leakage(_feature_set(generate_loans(1000)), max_auc=0.98).passed


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
