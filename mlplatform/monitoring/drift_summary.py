"""The latest drift report per feature, in a small file the endpoint's replicas export as metrics.

``drift_report`` (a Dagster asset) writes it beside the model's traffic profiles; each replica
reads it every few seconds and sets its drift gauges (:mod:`mlplatform.serving.metrics`), so the
numbers reach Prometheus without the serving side knowing anything of Dagster. The file is
replaced whole (:func:`~mlplatform.monitoring.durable.write_atomically`): a reader sees the old
report or the new one, never half of one. Nothing here imports Dagster or Ray.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mlplatform.monitoring.drift import DriftResult
from mlplatform.monitoring.durable import write_atomically
from mlplatform.monitoring.profiles import path_part

DRIFT_SUMMARY_NAME = "drift.json"


def drift_summary_path(traffic_dir: Path, model_name: str) -> Path:
    """Where a model's latest drift summary is kept: its traffic directory's ``drift.json``.

    Traffic windows live in the ``v<version>`` folders beside it, so readers of profiles never
    see this file.
    """
    return Path(traffic_dir) / path_part(model_name, "model name") / DRIFT_SUMMARY_NAME


@dataclasses.dataclass(frozen=True)
class FeatureDrift:
    """One feature's drift in the latest report.

    Attributes:
        feature: the column.
        effect: the effect size that decides (KS D for numeric, Hellinger for categorical
            features); ``None`` when it could not be computed.
        drifted: whether it exceeded its bound.
        test: the test behind the verdict (``ks``, ``chi-square``, ``type`` or ``none``).

    """

    feature: str
    effect: float | None
    drifted: bool
    test: str


@dataclasses.dataclass(frozen=True)
class DriftSummary:
    """What the replicas export of the latest drift report.

    Attributes:
        model_version: the version whose traffic was compared.
        reported_at: when the report was made (unix seconds).
        rows: the traffic rows compared.
        features: one entry per compared feature.

    """

    model_version: str
    reported_at: float
    rows: int
    features: tuple[FeatureDrift, ...]

    @classmethod
    def from_result(cls, result: DriftResult, model_version: str, now: float) -> DriftSummary:
        """The summary of a drift comparison of ``model_version``'s traffic made at ``now``."""
        return cls(
            model_version=str(model_version),
            reported_at=now,
            rows=result.rows,
            features=tuple(
                FeatureDrift(c.column, c.effect, c.drifted, c.test) for c in result.columns
            ),
        )

    def to_json(self) -> bytes:
        """The summary as JSON bytes."""
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DriftSummary:
        """Read a summary written by :meth:`to_json`.

        Raises:
            ValueError: if ``raw`` is not such a summary.

        """
        try:
            data = json.loads(raw)
            return cls(
                model_version=str(data["model_version"]),
                reported_at=float(data["reported_at"]),
                rows=int(data["rows"]),
                features=tuple(
                    FeatureDrift(
                        feature=str(each["feature"]),
                        effect=None if each["effect"] is None else float(each["effect"]),
                        drifted=bool(each["drifted"]),
                        test=str(each["test"]),
                    )
                    for each in data["features"]
                ),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a drift summary: {error!r}") from error


def write_drift_summary(traffic_dir: Path, model_name: str, summary: DriftSummary) -> Path:
    """Replace the model's drift summary, whole and durably; the path written."""
    return write_atomically(drift_summary_path(traffic_dir, model_name), summary.to_json())


def read_drift_summary(path: Path) -> DriftSummary | None:
    """The drift summary at ``path``, or ``None`` when no report was written yet.

    Raises:
        ValueError: if the file is there but is not a summary.
        OSError: if it cannot be read.

    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return DriftSummary.from_json(raw)
