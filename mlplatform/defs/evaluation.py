"""Evaluation: challenger vs current champion on the same held-out test split, and the gate.

The report carries metrics with bootstrap intervals, the paired challenger - champion difference,
plots, per-slice metrics with the fairness gap, and the challenger's model card. It is written as
Markdown and JSON under the platform home, logged to the MLflow run, and shown in the Dagster UI.
"""

import base64
import dataclasses
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from mlplatform.evaluation import tasks
from mlplatform.evaluation.card import render_model_card
from mlplatform.evaluation.importance import feature_importance
from mlplatform.evaluation.metrics import LOWER_IS_BETTER, Interval
from mlplatform.evaluation.slices import fairness_gaps, known_limitations
from mlplatform.model.dataset import FeatureSet
from mlplatform.model.registry import (
    CHAMPION_ALIAS,
    MODEL_CARD_ARTIFACT,
    ModelRef,
    load_tabular_model,
)
from mlplatform.model.spec import DataError
from mlplatform.model.training import code_lineage
from mlplatform.resources import MlflowTracking
from mlplatform.settings import load_settings


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
    """Test-split evaluation of the challenger and, when comparable, the champion it would replace.

    Intervals are ``{metric: {"point", "low", "high"}}``; ``difference`` is challenger - champion
    on the same bootstrap resamples.
    """

    challenger: ModelRef
    challenger_metrics: dict[str, float]
    champion: ModelRef | None
    champion_metrics: dict[str, float] | None
    champion_note: str
    test_rows: int
    threshold: float | None
    gate: GateDecision | None = None
    challenger_intervals: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    champion_intervals: dict[str, dict[str, float]] | None = None
    difference: dict[str, dict[str, float]] | None = None
    fairness_gaps: dict[str, float] = dataclasses.field(default_factory=dict)
    fairness_metric: str = "tpr"
    sensitive_features: tuple[str, ...] = ()
    absent_classes: tuple[str, ...] = ()
    model_card: str = ""
    task: str = "binary"


class PromotionGateConfig(dg.Config):
    """Bounds a challenger must meet to become champion, and how the report is computed."""

    gate_metric: str = Field(
        default="",
        description="Test metric the gate compares; empty = the task's default (roc_auc for "
        "binary, macro one-vs-rest roc_auc for multiclass, r2 for regression).",
    )
    min_score: float | None = Field(
        default=None,
        description="Absolute floor (ceiling for losses) on the gate metric; empty = the task's "
        "default (0.6 for roc_auc, 0.0 for r2).",
    )
    tolerance: float = Field(
        default=0.01,
        description="Non-inferiority margin: the whole paired interval of challenger - champion "
        "must lie above -tolerance (below +tolerance for losses).",
    )
    max_fairness_gap: float = Field(
        default=0.5,
        description="Largest allowed difference of the fairness metric between the slices of a "
        "sensitive feature (declared with MLPLATFORM_SENSITIVE_FEATURES or the data_source "
        "resource); gaps on other features are reported, never blocking.",
    )
    fairness_flag: float = Field(
        default=0.2, description="Gaps above this are flagged in the report and the model card."
    )
    fairness_metric: str = Field(
        default="",
        description="Slice metric compared; empty = the task's default (tpr for binary, "
        "accuracy for multiclass, mae for regression).",
    )
    slice_numeric_bins: dict[str, int] = Field(
        default_factory=dict, description="Numeric features to slice, with their quantile bins."
    )
    min_slice_rows: int = Field(default=30, description="Slices with fewer rows are only flagged.")
    min_slice_positives: int = Field(
        default=20, description="Binary: slices with fewer positive rows are only flagged."
    )
    bootstrap_resamples: int = Field(default=400, description="Bootstrap resamples for intervals.")
    confidence: float = Field(default=0.95, description="Confidence level of the intervals.")


def decide_promotion(report: EvaluationReport, config: PromotionGateConfig) -> GateDecision:
    """Apply the gate: the floor, the fairness bound, then non-inferiority against the champion.

    The fairness bound applies to the declared sensitive features only: a gap between the slices
    of another feature (say, diamond quality grades) describes the data, not unfair treatment,
    and is reported in the report and the card instead. Non-inferiority uses the paired
    bootstrap interval of challenger - champion, not the point estimates: a challenger passes
    unless it is credibly worse than the champion by more than the tolerance. Without a paired
    interval (no comparable champion) only the floor and the fairness bound apply.
    """
    profile = tasks.PROFILES[report.task]
    metric = config.gate_metric or profile.gate_metric
    if metric not in report.challenger_metrics:
        known = sorted(report.challenger_metrics)
        raise ValueError(f"unknown gate metric '{metric}'; choose one of {known}")
    lower_is_better = metric in LOWER_IS_BETTER
    floor = profile.gate_floor if config.min_score is None else config.min_score
    if config.gate_metric and config.min_score is None and metric != profile.gate_metric:
        raise ValueError(f"set min_score for the gate metric '{metric}'")
    score = report.challenger_metrics[metric]
    champion_score = report.champion_metrics[metric] if report.champion_metrics else None

    absent = ", ".join(report.absent_classes)
    scope = f" (over the classes present: the test split has no {absent})" if absent else ""

    def verdict(passed: bool, reason: str) -> GateDecision:
        return GateDecision(passed, reason + scope, metric, score, champion_score)

    if not (score <= floor if lower_is_better else score >= floor):
        bound = "ceiling" if lower_is_better else "floor"
        return verdict(
            False,
            f"test {metric} {score:.4f} misses the {bound} of {floor} (min_score in "
            "evaluation_report's config; or better data or features)",
        )
    bounded = {
        feature: gap
        for feature, gap in report.fairness_gaps.items()
        if feature in report.sensitive_features
    }
    worst_gap = max(bounded.items(), key=lambda item: item[1], default=None)
    if worst_gap and worst_gap[1] > config.max_fairness_gap:
        return verdict(
            False,
            f"{report.fairness_metric} gap {worst_gap[1]:.3f} between the slices of the "
            f"sensitive feature '{worst_gap[0]}' exceeds max_fairness_gap "
            f"{config.max_fairness_gap} (the slices are in the report)",
        )
    fairness = (
        f"sensitive {', '.join(f'{f} gap {g:.3f}' for f, g in bounded.items())} within "
        f"{config.max_fairness_gap}"
        if bounded
        else "no sensitive feature to bound"
        + (" with enough rows" if report.sensitive_features else " declared")
    )
    if champion_score is None or not report.difference:
        return verdict(
            True,
            f"test {metric} {score:.4f} clears {floor}; {fairness}; "
            f"no comparable champion ({report.champion_note})",
        )
    diff = report.difference[metric]
    champion = f"v{report.champion.version}" if report.champion else "champion"
    interval = f"[{diff['low']:+.4f}, {diff['high']:+.4f}]"
    if lower_is_better:
        passed = diff["high"] <= config.tolerance
    else:
        passed = diff["low"] >= -config.tolerance
    outcome = (
        "non-inferior to the champion"
        if passed
        else "credibly worse than the champion, which keeps serving (tolerance in "
        "evaluation_report's config)"
    )
    return verdict(
        passed,
        f"test {metric} {score:.4f} vs champion {champion} {champion_score:.4f}: difference "
        f"{diff['point']:+.4f}, {config.confidence:.0%} paired interval {interval}, tolerance "
        f"{config.tolerance}: {outcome}; {fairness}",
    )


def _intervals(intervals: dict[str, Interval]) -> dict[str, dict[str, float]]:
    return {name: interval.as_dict() for name, interval in intervals.items()}


def _metrics_table(report: EvaluationReport) -> str:
    def cell(intervals: dict[str, dict[str, float]] | None, metric: str) -> str:
        if not intervals or metric not in intervals:
            return "n/a"
        value = intervals[metric]
        return f"{value['point']:.4f} [{value['low']:.4f}, {value['high']:.4f}]"

    header = [f"challenger v{report.challenger.version}"]
    if report.champion_intervals and report.champion:
        header += [f"champion v{report.champion.version}", "difference"]
    rows = ["| metric | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for metric in report.challenger_intervals:
        cells = [cell(report.challenger_intervals, metric)]
        if len(header) > 1:
            cells += [cell(report.champion_intervals, metric), cell(report.difference, metric)]
        rows.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _image(title: str, png: bytes) -> str:
    return f"**{title}**\n\n![{title}](data:image/png;base64,{base64.b64encode(png).decode()})"


def _time_range(feature_set: FeatureSet) -> str | None:
    column = feature_set.spec.time_column
    if not column:
        return None
    stamps = pd.to_datetime(feature_set.train[column], errors="coerce", utc=True, format="mixed")
    return f"{stamps.min():%Y-%m-%d} to {stamps.max():%Y-%m-%d}"


def _task_description(feature_set: FeatureSet, threshold: float | None) -> tuple[str, str]:
    """``(task, intended use)`` sentences for the model card."""
    spec = feature_set.spec
    scope = "Not for populations or periods the training data does not cover."
    if spec.task == "binary":
        return (
            f"binary classification of '{spec.target}' (positive class: {spec.positive_class})",
            f"Scores the probability that '{spec.target}' is {spec.positive_class} for records "
            f"shaped like the training data; predictions at the decision threshold "
            f"{threshold:.3f}. {scope}",
        )
    if spec.task == "multiclass":
        classes = ", ".join(map(str, spec.classes))
        return (
            f"multiclass classification of '{spec.target}' ({len(spec.classes)} classes: "
            f"{classes})",
            f"Gives the probability of each class of '{spec.target}' for records shaped like the "
            f"training data; the prediction is the most probable class. {scope}",
        )
    return (
        f"regression of '{spec.target}'",
        f"Predicts the value of '{spec.target}' for records shaped like the training data. {scope}",
    )


def _target_summary(feature_set: FeatureSet) -> dict[str, float]:
    """Class shares of the training labels, or the target's distribution for regression."""
    spec, labels = feature_set.spec, feature_set.labels("train")
    if spec.task == "regression":
        return {
            "mean": float(np.mean(labels)),
            "std": float(np.std(labels)),
            "min": float(np.min(labels)),
            "max": float(np.max(labels)),
        }
    shares = np.bincount(labels, minlength=len(spec.classes)) / max(len(labels), 1)
    return {str(label): float(share) for label, share in zip(spec.classes, shares, strict=True)}


def build_model_card(
    report: EvaluationReport,
    feature_set: FeatureSet,
    slices: pd.DataFrame,
    config: PromotionGateConfig,
    lineage: dict[str, str],
) -> str:
    """The challenger's model card (Markdown): data, features, metrics, slices, lineage."""
    spec = feature_set.spec
    limitations = known_limitations(slices, report.fairness_gaps, config.fairness_flag)
    if report.absent_classes:
        limitations.append(
            f"The test split has no rows of {', '.join(report.absent_classes)}: the metrics are "
            "over the other classes, and performance on those classes is unmeasured."
        )
    if feature_set.time_ordered:
        limitations.append(
            "Evaluated on the most recent rows; accuracy on older or future periods may differ."
        )
    task, intended_use = _task_description(feature_set, report.threshold)
    return render_model_card(
        {
            "model_name": report.challenger.name,
            "model_version": report.challenger.version,
            "task": task,
            "intended_use": intended_use,
            "training_data": {
                "source": feature_set.source_uri,
                "data_version": feature_set.data_version,
                "rows": len(feature_set.train),
                "time_range": _time_range(feature_set),
                "class_balance" if spec.is_classification else "target": _target_summary(
                    feature_set
                ),
            },
            "features": dict(spec.features),
            "dropped": dict(spec.dropped),
            "threshold": report.threshold,
            "metrics": report.challenger_intervals,
            "champion_comparison": report.gate.reason if report.gate else report.champion_note,
            "slices": slices.to_dict("records"),
            "fairness_gaps": report.fairness_gaps,
            "fairness_bound": config.fairness_flag,
            "fairness_metric": report.fairness_metric,
            "sensitive_features": list(report.sensitive_features),
            "limitations": limitations,
            "lineage": lineage,
        }
    )


def write_report(report: EvaluationReport, slices: pd.DataFrame, plots: dict[str, bytes]) -> Path:
    """Write the report (JSON, Markdown, PNG plots, model card) under the platform home.

    Returns:
        The report's directory, one per challenger version.

    """
    directory = load_settings().home / "reports" / f"v{report.challenger.version}"
    directory.mkdir(parents=True, exist_ok=True)
    document = dataclasses.asdict(report) | {"slices": slices.to_dict("records")}
    (directory / "report.json").write_text(json.dumps(document, indent=2, default=str))
    (directory / MODEL_CARD_ARTIFACT).write_text(report.model_card)
    for name, png in plots.items():
        (directory / f"{name}.png").write_bytes(png)
    markdown = "\n\n".join(
        [
            f"# Evaluation of v{report.challenger.version}",
            f"Gate: {report.gate.reason if report.gate else 'not evaluated'}",
            _metrics_table(report),
            *(f"![{name}]({name}.png)" for name in plots),
        ]
    )
    (directory / "report.md").write_text(markdown)
    return directory


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
    """Challenger vs champion on the test split: intervals, plots, slices, model card, gate."""
    spec = features.spec
    task, profile = spec.task, tasks.PROFILES[spec.task]
    labels, inputs = features.labels("test"), features.inputs("test")
    challenger = load_tabular_model(candidate_model)
    scores = challenger.scores(inputs)
    threshold = challenger.threshold
    boot = {"n_resamples": config.bootstrap_resamples, "confidence": config.confidence}

    champion_version = mlflow_tracking.version_by_alias(CHAMPION_ALIAS)
    champion, champion_scores, champion_threshold = None, None, None
    note = "no champion yet"
    if champion_version is not None:
        champion = ModelRef(
            name=candidate_model.name,
            version=str(champion_version.version),
            mlflow_run_id=champion_version.run_id,
            algorithm=champion_version.tags.get("algorithm", "unknown"),
        )
        serving_model = load_tabular_model(champion)
        if serving_model.spec.task != task or serving_model.spec.classes != spec.classes:
            note = (
                f"champion v{champion.version} answers a different task "
                f"({serving_model.spec.task}, classes {list(serving_model.spec.classes)})"
            )
            context.log.warning(note)
        else:
            try:
                champion_scores = serving_model.scores(inputs)
                champion_threshold = serving_model.threshold
                note = f"champion v{champion.version} scored on the same test split"
            except DataError as error:
                note = f"champion v{champion.version} cannot score this data ({error})"
                context.log.warning(note)

    # Numeric sensitive features (age) are sliced in quartiles unless configured otherwise.
    sensitive_bins = {name: 4 for name in spec.sensitive if spec.features[name] == "numeric"}
    slices = tasks.task_slices(
        task,
        inputs,
        labels,
        scores,
        threshold,
        categorical=spec.columns_of("categorical") + spec.columns_of("boolean"),
        numeric_bins=sensitive_bins | config.slice_numeric_bins,
        min_rows=config.min_slice_rows,
    )
    if task == "binary":
        # A rate over a handful of positives is noise, not a fairness signal: such slices are
        # only listed (and flagged in the card), like slices with few rows.
        positives = slices["count"] * slices["positive_rate"]
        slices["small"] = slices["small"] | (positives.round() < config.min_slice_positives)
    fairness_metric = config.fairness_metric or profile.fairness_metric
    gaps = fairness_gaps(slices, fairness_metric)
    compared = champion_scores is not None
    report = EvaluationReport(
        challenger=candidate_model,
        challenger_metrics=tasks.task_metrics(task, labels, scores, threshold),
        champion=champion,
        champion_metrics=tasks.task_metrics(task, labels, champion_scores, champion_threshold)
        if compared
        else None,
        champion_note=note,
        test_rows=len(labels),
        threshold=threshold,
        challenger_intervals=_intervals(
            tasks.task_bootstrap(task, labels, scores, threshold, **boot)
        ),
        champion_intervals=_intervals(
            tasks.task_bootstrap(task, labels, champion_scores, champion_threshold, **boot)
        )
        if compared
        else None,
        difference=_intervals(
            tasks.task_paired_difference(
                task, labels, scores, champion_scores, threshold, champion_threshold, **boot
            )
        )
        if compared
        else None,
        fairness_gaps=gaps,
        fairness_metric=fairness_metric,
        sensitive_features=spec.sensitive,
        absent_classes=tuple(map(str, tasks.absent_classes(labels, spec.classes)))
        if spec.is_classification
        else (),
        task=task,
    )
    report = dataclasses.replace(report, gate=decide_promotion(report, config))

    importance, method = feature_importance(challenger, inputs, labels)
    curves = {f"challenger v{candidate_model.version}": scores}
    if compared and champion:
        curves[f"champion v{champion.version}"] = champion_scores
    plots = tasks.task_plots(
        task,
        labels,
        curves,
        tasks.predicted_classes(task, scores, threshold) if spec.is_classification else None,
        [str(label) for label in spec.classes],
        importance,
    )
    lineage = {
        "dagster_run_id": context.run_id,
        "mlflow_run_id": candidate_model.mlflow_run_id,
        **code_lineage(),
    }
    card = build_model_card(report, features, slices, config, lineage)
    report = dataclasses.replace(report, model_card=card)
    directory = write_report(report, slices, plots)

    # The challenger's own MLflow run carries its report and card, so they travel with the model.
    client, run_id = mlflow_tracking.client(), candidate_model.mlflow_run_id
    for name, value in report.challenger_metrics.items():
        client.log_metric(run_id, f"test_{name}", value)
    client.log_artifacts(run_id, str(directory), artifact_path="evaluation")
    client.log_text(run_id, card, MODEL_CARD_ARTIFACT)

    flagged = {name: gap for name, gap in gaps.items() if gap > config.fairness_flag}
    yield dg.Output(
        report,
        metadata={
            "challenger_version": candidate_model.version,
            "champion_version": champion.version if champion else "none",
            "test_rows": len(labels),
            "task": task,
            "threshold": round(threshold, 4) if threshold is not None else "n/a",
            **{f"test_{k}": round(v, 4) for k, v in report.challenger_metrics.items()},
            "metrics": dg.MetadataValue.md(_metrics_table(report)),
            "gate": report.gate.reason,
            "fairness_gaps": dg.MetadataValue.json(gaps),
            "sensitive_features": dg.MetadataValue.json(list(spec.sensitive)),
            "absent_test_classes": dg.MetadataValue.json(list(report.absent_classes)),
            "fairness_flagged": dg.MetadataValue.json(flagged),
            "slices": dg.MetadataValue.md(slices.round(4).to_markdown(index=False)),
            "feature_importance": dg.MetadataValue.md(
                f"Method: {method}\n\n" + importance.round(4).to_frame("importance").to_markdown()
            ),
            "plots": dg.MetadataValue.md(
                "\n\n".join(_image(name.replace("_", " "), png) for name, png in plots.items())
            ),
            "model_card": dg.MetadataValue.md(card),
            "report_json": dg.MetadataValue.path(str(directory / "report.json")),
            "report_markdown": dg.MetadataValue.path(str(directory / "report.md")),
            "mlflow_run_id": candidate_model.mlflow_run_id,
        },
    )
    gate = report.gate
    yield dg.AssetCheckResult(
        check_name="promotion_gate",
        passed=gate.passed,
        description=gate.reason,
        metadata={
            "metric": gate.metric,
            "challenger": gate.challenger_score,
            "champion": gate.champion_score if gate.champion_score is not None else "none",
            "difference": dg.MetadataValue.json((report.difference or {}).get(gate.metric)),
            "min_score": config.min_score,
            "tolerance": config.tolerance,
            "max_fairness_gap": config.max_fairness_gap,
        },
    )
