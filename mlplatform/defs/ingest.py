"""Ingest: read the configured source into ``raw_data`` and guard it with blocking checks."""

import hashlib
import warnings

import dagster as dg
import pandas as pd
from pydantic import Field

from mlplatform.resources import DataSource
from mlplatform.tabular import DataError, infer_task

RAW_DATA_CHECKS = ("schema", "no_empty_columns", "target_is_usable", "enough_rows")


class RawDataConfig(dg.Config):
    """Bounds the raw data must meet before anything is trained on it."""

    min_rows: int = Field(default=200, description="Fewest rows worth training on.")
    max_null_share: float = Field(
        default=0.9,
        description="A column with a larger share of missing values fails the data check.",
    )
    min_class_rows: int = Field(
        default=10, description="Classification: fewest rows of each class worth training on."
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
        problems.append(f"target column '{target}' is missing")
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
            "columns over the missing-value bound: "
            + ", ".join(f"{name} ({share:.0%} missing)" for name, share in failing.items())
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
    frame: pd.DataFrame, target: str, task: str | None = None, min_class_rows: int = 10
) -> dg.AssetCheckResult:
    """The target has no missing values and suits the task (inferred unless requested).

    Binary needs exactly two classes, multiclass 3 to 50, regression numeric values; for
    classification every class needs ``min_class_rows`` rows, or it cannot reach every split.
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
    if resolved in ("binary", "multiclass"):
        rare = counts[counts < min_class_rows]
        if not rare.empty:
            problems.append(
                "classes with fewer than "
                f"{min_class_rows} rows: "
                + ", ".join(f"{label} ({count})" for label, count in rare.items())
            )
    metadata: dict = {"task": resolved or "none"}
    if resolved == "regression":
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


def check_enough_rows(frame: pd.DataFrame, min_rows: int) -> dg.AssetCheckResult:
    """At least ``min_rows`` rows."""
    return dg.AssetCheckResult(
        check_name="enough_rows",
        passed=len(frame) >= min_rows,
        description=f"{len(frame)} rows (minimum {min_rows})",
        metadata={"rows": len(frame), "min_rows": min_rows},
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
def raw_data(context: dg.AssetExecutionContext, config: RawDataConfig, data_source: DataSource):
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
    yield check_target_is_usable(frame, target, data_source.resolved_task(), config.min_class_rows)
    yield check_enough_rows(frame, config.min_rows)
