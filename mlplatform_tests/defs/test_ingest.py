import dagster as dg
import numpy as np
import pandas as pd
import pytest

from mlplatform.defs.ingest import (
    check_enough_rows,
    check_no_empty_columns,
    check_schema,
    check_target_is_usable,
    data_version,
    raw_data,
)
from mlplatform.demo.data import generate_loans
from mlplatform.model.spec import DataError
from mlplatform.resources import DataSource, expand_source


@pytest.fixture
def frame() -> pd.DataFrame:
    return generate_loans(n_rows=300)


def test_data_version_is_a_content_hash(frame):
    assert data_version(frame) == data_version(frame.copy())
    changed = frame.copy()
    changed.loc[0, "age"] += 1
    assert data_version(changed) != data_version(frame)
    assert data_version(frame.rename(columns={"age": "years"})) != data_version(frame)


def test_checks_pass_on_good_data(frame):
    results = [
        check_schema(frame, "defaulted"),
        check_no_empty_columns(frame, 0.9),
        check_target_is_usable(frame, "defaulted"),
        check_enough_rows(frame, "defaulted"),
    ]
    assert all(result.passed for result in results)


def test_schema_check_fails_without_target(frame):
    result = check_schema(frame.drop(columns=["defaulted"]), "defaulted")
    assert not result.passed
    assert "target column 'defaulted' is missing" in result.description


def test_empty_column_check_names_the_column(frame):
    frame["income"] = None
    result = check_no_empty_columns(frame, 0.9)
    assert not result.passed
    assert "income (100% missing)" in result.description


@pytest.mark.parametrize(
    ("labels", "task", "message"),
    [
        ([1] * 300, None, "constant"),
        ([0, 1, 2] * 100, "binary", "3 distinct values"),
        ([0, None] * 150, None, "150 missing values"),
        (["a", "b", "c"] * 100, "regression", "not numeric"),
    ],
)
def test_target_check_fails_on_bad_labels(frame, labels, task, message):
    frame["defaulted"] = labels
    result = check_target_is_usable(frame, "defaulted", task)
    assert not result.passed
    assert message in result.description


@pytest.mark.parametrize(
    ("labels", "task"),
    [([0, 1, 2] * 100, "multiclass"), (np.linspace(0, 1, 300), "regression")],
)
def test_target_check_accepts_multiclass_and_regression_targets(frame, labels, task):
    frame["defaulted"] = labels
    result = check_target_is_usable(frame, "defaulted")
    assert result.passed
    assert result.metadata["task"].value == task


def test_row_count_check_asks_what_the_split_needs_per_class(frame):
    frame = frame.head(178).copy()  # a classic small multiclass dataset: 59 / 71 / 48 rows
    frame["defaulted"] = ["a"] * 59 + ["b"] * 71 + ["c"] * 48
    small = check_enough_rows(frame, "defaulted")
    assert small.passed
    assert small.description == (
        "178 rows; smallest class c has 48 (at least 20 per class, so that the 15% validation "
        "and test splits each get 3)"
    )
    frame["defaulted"] = ["a", "b"] * 85 + ["c"] * 8
    rare = check_enough_rows(frame, "defaulted")
    assert not rare.passed
    assert rare.description.startswith("too few rows of c (8): each class needs 20")
    assert "lower min_eval_class_rows" in rare.description
    assert check_enough_rows(frame, "defaulted", min_eval_class_rows=1).passed  # 7 needed


def test_row_count_check_for_regression(frame):
    frame["defaulted"] = np.linspace(0, 1, len(frame))
    assert check_enough_rows(frame.head(67), "defaulted").passed
    few = check_enough_rows(frame.head(66), "defaulted")
    assert not few.passed and "66 rows (at least 67" in few.description


def test_source_reads_csv_parquet_globs_and_folders(tmp_path, frame):
    frame.iloc[:100].to_csv(tmp_path / "part-1.csv", index=False)
    frame.iloc[100:].to_csv(tmp_path / "part-2.csv", index=False)
    frame.to_parquet(tmp_path / "all.parquet")
    assert len(DataSource(uri=str(tmp_path / "part-1.csv")).load()[0]) == 100
    assert len(DataSource(uri=str(tmp_path / "part-*.csv")).load()[0]) == 300
    assert len(DataSource(uri=str(tmp_path / "all.parquet")).load()[0]) == 300
    assert len(expand_source(str(tmp_path))) == 3
    assert len(DataSource(uri="file://" + str(tmp_path / "all.parquet")).load()[0]) == 300


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="no data files found"):
        DataSource(uri=str(tmp_path / "nope.csv")).load()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"expected a \.csv or \.parquet"):
        DataSource(uri=str(tmp_path / "notes.txt")).load()
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot parse"):
        DataSource(uri=str(tmp_path / "broken.parquet")).load()


def test_custom_source_needs_a_target(tmp_path, frame):
    frame.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match="MLPLATFORM_TARGET"):
        DataSource(uri=str(tmp_path / "d.csv")).resolved_target()


def test_demo_source_is_written_under_the_platform_home(platform_home):
    data, uri = DataSource().load()
    assert uri.startswith(str(platform_home))
    assert len(data) == 5000
    assert DataSource().resolved_target() == "defaulted"


def test_source_settings_come_from_the_environment(monkeypatch, tmp_path, frame):
    frame.to_csv(tmp_path / "env.csv", index=False)
    monkeypatch.setenv("MLPLATFORM_SOURCE", str(tmp_path / "env.csv"))
    monkeypatch.setenv("MLPLATFORM_TARGET", "defaulted")
    data, uri = DataSource().load()
    assert uri == str(tmp_path / "env.csv")
    assert len(data) == 300


def test_materialize_raw_data_records_version_and_checks(small_loans_csv):
    result = dg.materialize(
        [raw_data],
        resources={"data_source": DataSource(uri=str(small_loans_csv), target="defaulted")},
    )
    assert result.success
    materialization = result.asset_materializations_for_node("raw_data")[0]
    assert materialization.metadata["dagster/row_count"].value == 1200
    assert materialization.metadata["data_version"].value == data_version(
        pd.read_csv(small_loans_csv)
    )
    checks = result.get_asset_check_evaluations()
    assert {c.check_name for c in checks} == {
        "schema",
        "no_empty_columns",
        "target_is_usable",
        "enough_rows",
    }
    assert all(c.passed for c in checks)


def test_materialize_raw_data_fails_its_check_on_one_class_target(tmp_path):
    bad = generate_loans(n_rows=400)
    bad["defaulted"] = 0
    bad.to_csv(tmp_path / "bad.csv", index=False)
    result = dg.materialize(
        [raw_data],
        resources={"data_source": DataSource(uri=str(tmp_path / "bad.csv"), target="defaulted")},
        raise_on_error=False,
    )
    assert not result.success
    failed = [c for c in result.get_asset_check_evaluations() if not c.passed]
    assert [c.check_name for c in failed] == ["target_is_usable"]
