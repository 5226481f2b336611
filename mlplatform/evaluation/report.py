"""The evaluation report and the model card: what a person reads before trusting a model."""

import base64
import dataclasses
import json
from pathlib import Path

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


def build_model_card(
    report: EvaluationReport,
    feature_set: FeatureSet,
    slices: pd.DataFrame,
    config: GateParams,
    lineage: dict[str, str],
) -> str:
    """The challenger's model card (Markdown): data, features, metrics, slices, lineage."""
    spec, strategy = feature_set.spec, feature_set.spec.strategy
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
    task, intended_use = strategy.describe(spec.target, spec.classes, report.threshold)
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
                strategy.target_summary_name: strategy.target_summary(
                    feature_set.labels("train"), spec.classes
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
