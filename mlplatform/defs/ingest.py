"""Ingest: read the configured source into ``raw_data`` and guard it with blocking checks."""

import hashlib
import math
import warnings
from collections.abc import Iterator

import dagster as dg
import pandas as pd
from pydantic import Field

from mlplatform.model.dataset import HOLDOUT_SHARE
from mlplatform.model.spec import DataError, infer_task
from mlplatform.resources import DataSource
from mlplatform.tasks.strategies import strategy_for

RAW_DATA_CHECKS = ("schema", "no_empty_columns", "target_is_usable", "enough_rows")


class RawDataConfig(dg.Config):
    """Bounds the raw data must meet before anything is trained on it."""

    max_null_share: float = Field(
        default=0.9,
        description="A column with a larger share of missing values fails the data check.",
    )
    min_eval_class_rows: int = Field(
        default=3,
        description="Classification: fewest rows of each class the validation and the test "
        f"split should each receive (at the default {HOLDOUT_SHARE:.0%} shares): every class "
        f"then needs ceil(this / {HOLDOUT_SHARE}) rows.",
    )
    min_eval_rows: int = Field(
        default=10,
        description="Regression: fewest rows the validation and the test split should each "
        f"receive (at the default {HOLDOUT_SHARE:.0%} shares).",
    )


def data_version(frame: pd.DataFrame) -> str:
    """Content hash of a frame (values, column names and order): the data's version.

    The same data always gets the same version, whichever file it came from.
    """
    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def check_schema(frame: pd.DataFrame, target: str) -> dg.AssetCheckResult:
    """The target column exists, column names are unique, and at least one feature remains."""
    problems = []
    if target not in frame.columns:
        problems.append(
            f"target column '{target}' is missing (set MLPLATFORM_TARGET to the label column)"
        )
    duplicated = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
    if duplicated:
        problems.append(f"duplicated columns: {', '.join(duplicated)}")
    if len([c for c in frame.columns if c != target]) == 0:
        problems.append("no feature columns")
    return dg.AssetCheckResult(
        check_name="schema",
        passed=not problems,
        description="; ".join(problems) or "target present, columns unique, features present",
        metadata={
            "columns": dg.MetadataValue.json([str(c) for c in frame.columns]),
            "target": target,
        },
    )


def check_no_empty_columns(frame: pd.DataFrame, max_null_share: float) -> dg.AssetCheckResult:
    """No column is (almost) entirely missing: that signals a broken extract, not real data."""
    null_share = frame.isna().mean() if len(frame) else pd.Series(1.0, index=frame.columns)
    failing = null_share[null_share > max_null_share]
    return dg.AssetCheckResult(
        check_name="no_empty_columns",
        passed=failing.empty,
        description=(
            f"columns over the missing-value bound of {max_null_share:.0%}: "
            + ", ".join(f"{name} ({share:.0%} missing)" for name, share in failing.items())
            + " (drop them from the data, or raise max_null_share in raw_data's config)"
            if not failing.empty
            else f"every column under {max_null_share:.0%} missing"
        ),
        metadata={
            "max_null_share": max_null_share,
            "null_share": dg.MetadataValue.json(
                {str(k): round(float(v), 4) for k, v in null_share.items()}
            ),
        },
    )


def check_target_is_usable(
    frame: pd.DataFrame, target: str, task: str | None = None
) -> dg.AssetCheckResult:
    """The target has no missing values and suits the task (inferred unless requested).

    Binary needs exactly two classes, multiclass 3 to 50, regression numeric values.
    """
    if target not in frame.columns:
        return dg.AssetCheckResult(
            check_name="target_is_usable",
            passed=False,
            description=f"target column '{target}' is missing",
        )
    labels = frame[target]
    problems, resolved = [], None
    try:
        resolved = infer_task(labels, task)
    except DataError as error:
        problems.append(str(error))
    counts = labels.value_counts()
    metadata: dict = {"task": resolved or "none"}
    if resolved is not None and not strategy_for(resolved).has_classes:
        metadata["target_summary"] = dg.MetadataValue.json(
            {k: float(v) for k, v in labels.describe().items()}
        )
    else:
        metadata["class_counts"] = dg.MetadataValue.json(
            {str(k): int(v) for k, v in counts.head(50).items()}
        )
    return dg.AssetCheckResult(
        check_name="target_is_usable",
        passed=not problems,
        description="; ".join(problems) or f"{resolved} target, no missing labels",
        metadata=metadata,
    )


def check_enough_rows(
    frame: pd.DataFrame,
    target: str,
    task: str | None = None,
    min_eval_class_rows: int = 3,
    min_eval_rows: int = 10,
) -> dg.AssetCheckResult:
    """Enough rows for the split and the evaluation: no flat minimum, what the split needs.

    Classification: every class needs ``ceil(min_eval_class_rows / HOLDOUT_SHARE)`` rows, so
    the validation and test splits each get ``min_eval_class_rows`` of it; a 178-row dataset
    with three balanced classes trains (with intervals as wide as they honestly are).
    Regression: ``ceil(min_eval_rows / HOLDOUT_SHARE)`` rows in all.
    """
    try:
        resolved = infer_task(frame[target], task) if target in frame.columns else None
    except DataError:
        resolved = None  # target_is_usable says why
    rows = len(frame)
    if resolved is not None and strategy_for(resolved).has_classes:
        needed = math.ceil(min_eval_class_rows / HOLDOUT_SHARE)
        counts = frame[target].value_counts()
        short = counts[counts < needed]
        smallest = f"smallest class {counts.index[-1]} has {counts.iloc[-1]:,}"
        passed = short.empty
        description = (
            f"{rows:,} rows; {smallest} (at least {needed} per class, so that the "
            f"{HOLDOUT_SHARE:.0%} validation and test splits each get {min_eval_class_rows})"
            if passed
            else "too few rows of "
            + ", ".join(f"{label} ({count})" for label, count in short.items())
            + f": each class needs {needed}, so that the {HOLDOUT_SHARE:.0%} validation and test "
            f"splits each get {min_eval_class_rows}. Add rows of these classes, merge them into "
            "others, or lower min_eval_class_rows in raw_data's config"
        )
    else:
        needed = math.ceil(min_eval_rows / HOLDOUT_SHARE)
        passed = rows >= needed
        description = (
            f"{rows:,} rows (at least {needed}, so that the {HOLDOUT_SHARE:.0%} validation and "
            f"test splits each get {min_eval_rows})"
            + ("" if passed else ". Add rows, or lower min_eval_rows in raw_data's config")
        )
    return dg.AssetCheckResult(
        check_name="enough_rows",
        passed=passed,
        description=description,
        metadata={"rows": rows, "needed": needed, "task": resolved or "unknown"},
    )


def _column_schema(frame: pd.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[dg.TableColumn(str(name), str(dtype)) for name, dtype in frame.dtypes.items()]
    )


@dg.asset(
    group_name="ingest",
    kinds={"pandas"},
    owners=["team:ml-platform"],
    tags={"stage": "ingest"},
    check_specs=[
        dg.AssetCheckSpec(name, asset="raw_data", blocking=True) for name in RAW_DATA_CHECKS
    ],
)
def raw_data(
    context: dg.AssetExecutionContext, config: RawDataConfig, data_source: DataSource
) -> Iterator[dg.Output[pd.DataFrame] | dg.AssetCheckResult]:
    """Raw training data read from the configured source (the embedded demo dataset by default)."""
    frame, uri = data_source.load()
    target = data_source.resolved_target()
    version = data_version(frame)
    context.log.info(
        f"read {len(frame)} rows x {frame.shape[1]} columns from {uri} (data version {version})"
    )
    with warnings.catch_warnings():
        # Output(data_version=...) is beta; it is what the UI shows as the data version.
        warnings.simplefilter("ignore", dg.BetaWarning)
        output = dg.Output(
            frame,
            data_version=dg.DataVersion(version),
            metadata={
                "source_uri": uri,
                "data_version": version,
                "target": target,
                "dagster/row_count": len(frame),
                "columns": frame.shape[1],
                "dagster/column_schema": _column_schema(frame),
                "preview": dg.MetadataValue.md(frame.head(5).to_markdown(index=False)),
            },
        )
    yield output
    yield check_schema(frame, target)
    yield check_no_empty_columns(frame, config.max_null_share)
    task = data_source.resolved_task()
    yield check_target_is_usable(frame, target, task)
    yield check_enough_rows(frame, target, task, config.min_eval_class_rows, config.min_eval_rows)
