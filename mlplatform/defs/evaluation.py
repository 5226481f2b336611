"""Evaluation: challenger vs current champion on the same held-out test split, and the gate."""

import dataclasses

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from mlplatform.defs.features import FeatureSet
from mlplatform.defs.training import CHAMPION_ALIAS, ModelRef, score_probabilities
from mlplatform.resources import MlflowTracking
from mlplatform.tabular import DataError, TabularModel

LOWER_IS_BETTER = frozenset({"log_loss", "brier"})


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """The promotion gate's verdict and the numbers behind it."""

    passed: bool
    reason: str
    metric: str
    challenger_score: float
    champion_score: float | None


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    """Test-split metrics of the challenger and, when comparable, the champion it would replace."""

    challenger: ModelRef
    challenger_metrics: dict[str, float]
    champion: ModelRef | None
    champion_metrics: dict[str, float] | None
    champion_note: str
    test_rows: int
    threshold: float
    gate: GateDecision | None = None


class PromotionGateConfig(dg.Config):
    """Bounds a challenger must meet to become champion."""

    gate_metric: str = Field(default="roc_auc", description="Test metric the gate compares.")
    min_score: float = Field(
        default=0.6, description="Absolute floor (ceiling for losses) on the gate metric."
    )
    tolerance: float = Field(
        default=0.005,
        description="How much worse than the champion the challenger may be and still pass.",
    )


def classification_metrics(
    labels: np.ndarray, probability: np.ndarray, threshold: float
) -> dict[str, float]:
    """Probability metrics plus accuracy, precision, recall and F1 at ``threshold``."""
    predicted = (probability >= threshold).astype(int)
    return score_probabilities(labels, probability) | {
        "accuracy": float(accuracy_score(labels, predicted)),
        "precision": float(precision_score(labels, predicted, zero_division=0)),
        "recall": float(recall_score(labels, predicted, zero_division=0)),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
    }


def decide_promotion(report: EvaluationReport, config: PromotionGateConfig) -> GateDecision:
    """Apply the gate: the floor, then no worse than the champion beyond the tolerance."""
    metric = config.gate_metric
    if metric not in report.challenger_metrics:
        raise ValueError(
            f"unknown gate metric '{metric}'; choose one of {sorted(report.challenger_metrics)}"
        )
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    score = report.challenger_metrics[metric]
    champion_score = report.champion_metrics[metric] if report.champion_metrics else None
    if sign * score < sign * config.min_score:
        bound = "ceiling" if sign < 0 else "floor"
        reason = f"test {metric} {score:.4f} misses the {bound} of {config.min_score}"
        return GateDecision(False, reason, metric, score, champion_score)
    if champion_score is None:
        reason = (
            f"test {metric} {score:.4f} clears {config.min_score}; "
            f"no comparable champion ({report.champion_note})"
        )
        return GateDecision(True, reason, metric, score, None)
    margin = sign * (score - champion_score)
    verdict = (
        "worse than"
        if margin < -config.tolerance
        else "within tolerance of"
        if margin < 0
        else "at least as good as"
    )
    reason = (
        f"test {metric} {score:.4f} vs champion "
        f"v{report.champion.version if report.champion else '?'} {champion_score:.4f} "
        f"({margin:+.4f}, tolerance {config.tolerance}): {verdict} the champion"
    )
    return GateDecision(margin >= -config.tolerance, reason, metric, score, champion_score)


def load_tabular_model(ref: ModelRef) -> TabularModel:
    """Load a registered version's :class:`TabularModel`."""
    return mlflow.pyfunc.load_model(ref.uri).unwrap_python_model()


def _metrics_table(report: EvaluationReport) -> str:
    frame = pd.DataFrame({f"challenger v{report.challenger.version}": report.challenger_metrics})
    if report.champion_metrics and report.champion:
        frame[f"champion v{report.champion.version}"] = pd.Series(report.champion_metrics)
        frame["difference"] = frame.iloc[:, 0] - frame.iloc[:, 1]
    return frame.round(4).rename_axis("metric").to_markdown()


@dg.asset(
    group_name="evaluation",
    kinds={"mlflow", "sklearn"},
    owners=["team:ml-platform"],
    check_specs=[dg.AssetCheckSpec("promotion_gate", asset="evaluation_report", blocking=True)],
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: PromotionGateConfig,
    features: FeatureSet,
    candidate_model: ModelRef,
    mlflow_tracking: MlflowTracking,
):
    """Challenger vs current champion on the held-out test split; the blocking promotion gate."""
    labels, inputs = features.labels("test"), features.inputs("test")
    challenger = load_tabular_model(candidate_model)
    challenger_metrics = classification_metrics(
        labels, challenger.positive_probability(inputs), challenger.threshold
    )

    champion_version = mlflow_tracking.version_by_alias(CHAMPION_ALIAS)
    champion, champion_metrics, note = None, None, "no champion yet"
    if champion_version is not None:
        champion = ModelRef(
            name=candidate_model.name,
            version=str(champion_version.version),
            mlflow_run_id=champion_version.run_id,
            algorithm=champion_version.tags.get("algorithm", "unknown"),
        )
        try:
            model = load_tabular_model(champion)
            champion_metrics = classification_metrics(
                labels, model.positive_probability(inputs), model.threshold
            )
            note = f"champion v{champion.version} scored on the same test split"
        except DataError as error:
            note = f"champion v{champion.version} cannot score this data ({error})"
            context.log.warning(note)

    report = EvaluationReport(
        challenger=candidate_model,
        challenger_metrics=challenger_metrics,
        champion=champion,
        champion_metrics=champion_metrics,
        champion_note=note,
        test_rows=len(labels),
        threshold=challenger.threshold,
    )
    mlflow.log_metrics({f"test_{name}": value for name, value in challenger_metrics.items()})
    decision = decide_promotion(report, config)
    report = dataclasses.replace(report, gate=decision)
    yield dg.Output(
        report,
        metadata={
            "challenger_version": candidate_model.version,
            "champion_version": champion.version if champion else "none",
            "test_rows": len(labels),
            "threshold": challenger.threshold,
            **{f"test_{name}": round(value, 4) for name, value in challenger_metrics.items()},
            "metrics": dg.MetadataValue.md(_metrics_table(report)),
            "gate": decision.reason,
            "mlflow_run_id": candidate_model.mlflow_run_id,
        },
    )
    yield dg.AssetCheckResult(
        check_name="promotion_gate",
        passed=decision.passed,
        description=decision.reason,
        metadata={
            "metric": decision.metric,
            "challenger": decision.challenger_score,
            "champion": decision.champion_score if decision.champion_score is not None else "none",
            "min_score": config.min_score,
            "tolerance": config.tolerance,
        },
    )
