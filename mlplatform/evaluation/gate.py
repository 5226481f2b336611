"""The promotion gate: a challenger replaces the champion only when the numbers say it may.

The report it reads carries test-split metrics with bootstrap intervals for the challenger and,
when comparable, the champion it would replace, the paired difference, and the fairness gaps.
"""

import dataclasses

from pydantic import BaseModel, ConfigDict, Field

from mlplatform.model.registry import ModelRef
from mlplatform.tasks.base import Task
from mlplatform.tasks.strategies import strategy_for


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
    task: Task = "binary"


class GateParams(BaseModel):
    """Bounds a challenger must meet to become champion, and how the report is computed."""

    model_config = ConfigDict(frozen=True)

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


def decide_promotion(report: EvaluationReport, config: GateParams) -> GateDecision:
    """Apply the gate: the floor, the fairness bound, then non-inferiority against the champion.

    The fairness bound applies to the declared sensitive features only: a gap between the slices
    of another feature (say, diamond quality grades) describes the data, not unfair treatment,
    and is reported in the report and the card instead. Non-inferiority uses the paired
    bootstrap interval of challenger - champion, not the point estimates: a challenger passes
    unless it is credibly worse than the champion by more than the tolerance. Without a paired
    interval (no comparable champion) only the floor and the fairness bound apply.
    """
    strategy = strategy_for(report.task)
    metric = config.gate_metric or strategy.gate_metric
    if metric not in report.challenger_metrics:
        known = sorted(report.challenger_metrics)
        raise ValueError(f"unknown gate metric '{metric}'; choose one of {known}")
    lower_is_better = metric in strategy.lower_is_better
    floor = strategy.gate_floor if config.min_score is None else config.min_score
    if config.gate_metric and config.min_score is None and metric != strategy.gate_metric:
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
