"""The evaluation report and the model card: what a person reads before trusting a model."""

import base64
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from mlplatform.evaluation.card import render_model_card
from mlplatform.evaluation.gate import EvaluationReport, GateParams
from mlplatform.model.dataset import FeatureSet
from mlplatform.model.registry import MODEL_CARD_ARTIFACT
from mlplatform.settings import load_settings
from mlplatform.tasks.slices import known_limitations


def metrics_table(report: EvaluationReport) -> str:
    """The report's intervals as a Markdown table: challenger, champion and their difference."""

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


def image(title: str, png: bytes) -> str:
    """A PNG inlined in Markdown (Dagster's UI shows data URIs)."""
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
    config: GateParams,
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
            metrics_table(report),
            *(f"![{name}]({name}.png)" for name in plots),
        ]
    )
    (directory / "report.md").write_text(markdown)
    return directory
