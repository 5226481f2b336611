"""Evaluation: challenger vs current champion on the same held-out test split, and the gate.

The report carries metrics with bootstrap intervals, the paired challenger - champion difference,
plots, per-slice metrics with the fairness gap, and the challenger's model card. It is written as
Markdown and JSON under the platform home, logged to the MLflow run, and shown in the Dagster UI.
"""

import dataclasses
from collections.abc import Iterator

import dagster as dg

from mlplatform.evaluation.gate import EvaluationReport, GateParams, decide_promotion
from mlplatform.evaluation.importance import feature_importance
from mlplatform.evaluation.report import build_model_card, image, metrics_table, write_report
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
from mlplatform.tasks.metrics import Interval
from mlplatform.tasks.slices import fairness_gaps


class PromotionGateConfig(GateParams, dg.Config):
    """Bounds a challenger must meet to become champion, and how the report is computed."""


def _intervals(intervals: dict[str, Interval]) -> dict[str, dict[str, float]]:
    return {name: interval.as_dict() for name, interval in intervals.items()}


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
) -> Iterator[dg.Output[EvaluationReport] | dg.AssetCheckResult]:
    """Challenger vs champion on the test split: intervals, plots, slices, model card, gate."""
    spec, strategy = features.spec, features.spec.strategy
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
        # A champion of another task, or of other classes, cannot be compared on these labels.
        if (serving_model.spec.task, serving_model.spec.classes) != (spec.task, spec.classes):
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
    slices = strategy.slices(
        inputs,
        labels,
        scores,
        threshold,
        categorical=spec.columns_of("categorical") + spec.columns_of("boolean"),
        numeric_bins=sensitive_bins | config.slice_numeric_bins,
        min_rows=config.min_slice_rows,
        min_positives=config.min_slice_positives,
    )
    fairness_metric = config.fairness_metric or strategy.fairness_metric
    gaps = fairness_gaps(slices, fairness_metric)
    compared = champion_scores is not None
    report = EvaluationReport(
        challenger=candidate_model,
        challenger_metrics=strategy.metrics(labels, scores, threshold),
        champion=champion,
        champion_metrics=strategy.metrics(labels, champion_scores, champion_threshold)
        if compared
        else None,
        champion_note=note,
        test_rows=len(labels),
        threshold=threshold,
        challenger_intervals=_intervals(strategy.bootstrap(labels, scores, threshold, **boot)),
        champion_intervals=_intervals(
            strategy.bootstrap(labels, champion_scores, champion_threshold, **boot)
        )
        if compared
        else None,
        difference=_intervals(
            strategy.paired_difference(
                labels, scores, champion_scores, threshold, champion_threshold, **boot
            )
        )
        if compared
        else None,
        fairness_gaps=gaps,
        fairness_metric=fairness_metric,
        sensitive_features=spec.sensitive,
        absent_classes=tuple(map(str, strategy.absent_classes(labels, spec.classes))),
        task=spec.task,
    )
    report = dataclasses.replace(report, gate=decide_promotion(report, config))

    importance, method = feature_importance(challenger, inputs, labels)
    curves = {f"challenger v{candidate_model.version}": scores}
    if compared and champion:
        curves[f"champion v{champion.version}"] = champion_scores
    plots = strategy.plots(
        labels, curves, threshold, [str(label) for label in spec.classes], importance
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
            "task": spec.task,
            "threshold": round(threshold, 4) if threshold is not None else "n/a",
            **{f"test_{k}": round(v, 4) for k, v in report.challenger_metrics.items()},
            "metrics": dg.MetadataValue.md(metrics_table(report)),
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
                "\n\n".join(image(name.replace("_", " "), png) for name, png in plots.items())
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
