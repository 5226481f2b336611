"""Rollout decisions as pure functions: may the challenger in the release move on.

A challenger that passed the offline gate enters the release in ``shadow`` (it scores every
request beside the champion; the champion answers), then ``canary`` (it answers a share of the
requests), then is ``promoted``. At each look the rollout sensor gathers the live evidence of
both versions (errors, latency, the paired comparison of their scores on the same records, the
labelled performance difference with its interval) and hands it to :func:`decide_rollout`, which
says ``wait`` (not enough evidence yet), ``advance`` (every rule holds with the minimum evidence
in) or ``roll_back`` (a rule fails). A rule fails as soon as the evidence in cannot pass it any
more, so a challenger that errors is rolled back without waiting for the minimum.

Nothing here imports Dagster or Ray; the comparisons take plain arrays and numbers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from mlplatform.monitoring.evidence import (
    VersionCounts,
    bucket_quantile_ms,
    read_stage_counts,
    requests_slower_than,
)
from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.monitoring.rules import SensorCursor
from mlplatform.tasks.base import Task, TaskStrategy
from mlplatform.tasks.metrics import (
    Interval,
    bootstrap_indices,
    check_bootstrap_arguments,
    percentile_interval,
)
from mlplatform.tasks.strategies import strategy_for

RolloutStage = Literal["shadow", "canary", "promoted", "rolled_back"]
"""Where a challenger is: beside the champion, answering a share, the champion, or out."""

RolloutAction = Literal["wait", "advance", "roll_back"]
"""What a look at the evidence decides."""

NEXT_STAGE: dict[RolloutStage, RolloutStage] = {"shadow": "canary", "canary": "promoted"}
"""The stage an ``advance`` leads to."""


@dataclasses.dataclass(frozen=True)
class RolloutPolicy:
    """The minimum evidence of each stage and the bounds the challenger must keep.

    Defaults are sized for the demo's simulated traffic (a few requests a second): a stage
    needs minutes, not days. Production endpoints should raise the minimums.

    Attributes:
        canary_share: share of requests the challenger answers in ``canary``.
        min_requests: requests the challenger must have scored in the stage before it advances.
        min_seconds: seconds the stage must have lasted before it advances.
        min_labels: labelled records (scored by both models) before ``canary`` is promoted;
            0 promotes without labels.
        max_error_rate_excess: most the challenger's error rate may exceed the champion's.
        max_p99_ratio: the challenger's p99 latency may be at most this multiple of the
            champion's, plus ``p99_slack_ms`` (so a sub-millisecond champion does not fail a
            challenger over noise). Judged on the challenger's requests slower than that
            bound: rolled back when they are more than 1% of its requests with 95%
            confidence, so a few slow requests (a pause of the process) in a small sample
            never roll a challenger back, and a challenger slow throughout is rolled back
            after the minimum of requests.
        p99_slack_ms: see ``max_p99_ratio``.
        min_agreement: in shadow, the least share of records on which both models decide the
            same (the same class, or the same bin of the value).
        max_score_shift: in shadow, the largest mean absolute difference of the two scores on
            the same records.
        max_distribution_distance: in shadow, the largest Hellinger distance between the two
            models' score distributions.
        max_performance_loss: the challenger is rolled back when the whole interval of its
            labelled performance difference lies below ``-max_performance_loss`` (it is worse
            with confidence), and promoted only when the interval's upper end is at least
            ``-max_performance_loss``.

    """

    canary_share: float = 0.2
    min_requests: int = 200
    min_seconds: float = 60.0
    min_labels: int = 200
    max_error_rate_excess: float = 0.01
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 5.0
    min_agreement: float = 0.9
    max_score_shift: float = 0.1
    max_distribution_distance: float = 0.2
    max_performance_loss: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.canary_share < 1:
            raise ValueError(f"canary_share must be between 0 and 1, got {self.canary_share}")
        for name in ("min_requests", "min_seconds", "min_labels", "max_error_rate_excess"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.max_p99_ratio < 1:
            raise ValueError(f"max_p99_ratio must be at least 1, got {self.max_p99_ratio}")


@dataclasses.dataclass(frozen=True)
class VersionTraffic:
    """What one version of the release answered in the stage.

    Attributes:
        requests: requests it scored (answered, or in shadow scored beside the champion).
        errors: of those, the ones that failed (a server error, or a scoring error in shadow).
        latency_buckets: its requests per scoring-latency bucket
            (:data:`~mlplatform.monitoring.evidence.LATENCY_BUCKETS_MS`, then above); empty
            when not measured.

    """

    requests: int
    errors: int
    latency_buckets: tuple[int, ...] = ()

    @property
    def error_rate(self) -> float:
        """Errors per request (0 before any request)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p99_ms(self) -> float | None:
        """99th percentile of its scoring latency, in milliseconds; ``None`` before any."""
        return bucket_quantile_ms(self.latency_buckets, 0.99)


@dataclasses.dataclass(frozen=True)
class ShadowComparison:
    """The two models on the same records (see :func:`compare_scores`).

    Attributes:
        rows: records scored by both.
        agreement: share of them on which both decide the same.
        score_shift: mean absolute difference of their scores.
        distribution_distance: Hellinger distance between their score distributions.

    """

    rows: int
    agreement: float
    score_shift: float
    distribution_distance: float


@dataclasses.dataclass(frozen=True)
class LabelledComparison:
    """The labelled performance of challenger minus champion on the same records.

    Attributes:
        labels: labelled records scored by both.
        metric: the metric compared (the task's gate metric).
        difference: challenger - champion with its interval, oriented so that higher is better
            for the challenger (a loss's difference is negated).

    """

    labels: int
    metric: str
    difference: Interval


@dataclasses.dataclass(frozen=True)
class RolloutEvidence:
    """Everything a look at the rollout knows.

    Attributes:
        stage: the challenger's stage (``shadow`` or ``canary``).
        seconds_in_stage: how long it has been in it.
        champion: the champion's traffic in the stage.
        challenger: the challenger's traffic in the stage.
        shadow: the paired comparison of their scores (shadow; ``None`` when none yet).
        labelled: the labelled comparison (``None`` when no labels yet).

    """

    stage: RolloutStage
    seconds_in_stage: float
    champion: VersionTraffic
    challenger: VersionTraffic
    shadow: ShadowComparison | None = None
    labelled: LabelledComparison | None = None


@dataclasses.dataclass(frozen=True)
class RolloutVerdict:
    """A look's decision with its reasons, as recorded in MLflow tags and Dagster metadata.

    Attributes:
        action: ``wait``, ``advance`` or ``roll_back``.
        stage: the stage the challenger is in after the decision.
        reasons: one line per rule failed (``roll_back``) or per missing evidence (``wait``);
            for ``advance``, what held.

    """

    action: RolloutAction
    stage: RolloutStage
    reasons: tuple[str, ...]


def decide_rollout(evidence: RolloutEvidence, policy: RolloutPolicy) -> RolloutVerdict:
    """Wait, advance or roll back the challenger on its live evidence.

    Rolled back when any rule fails: its error rate exceeds the champion's by more than the
    bound (judged only once the errors in cannot be diluted below it by the minimum of
    requests), more than 1% of its requests are credibly slower than its p99 bound (after the
    minimum of requests; see ``RolloutPolicy.max_p99_ratio``), in shadow its
    agreement, score shift or distribution distance is out of bounds (after the minimum), or
    its labelled performance is worse with confidence. Advanced when none fails and the stage
    has its minimum of requests, time and (canary) labels. Otherwise it waits.

    Raises:
        ValueError: if the stage is not ``shadow`` or ``canary``.

    """
    if evidence.stage not in NEXT_STAGE:
        raise ValueError(f"no rollout decision in stage {evidence.stage!r}")
    failed = _failed_rules(evidence, policy)
    if failed:
        return RolloutVerdict("roll_back", "rolled_back", tuple(failed))
    missing = _missing_evidence(evidence, policy)
    if missing:
        return RolloutVerdict("wait", evidence.stage, tuple(missing))
    return RolloutVerdict("advance", NEXT_STAGE[evidence.stage], tuple(_held(evidence)))


def _failed_rules(evidence: RolloutEvidence, policy: RolloutPolicy) -> list[str]:
    champion, challenger = evidence.champion, evidence.challenger
    failed = []
    # Errors: even if every request still to come up to the minimum succeeds, too many.
    judged_over = max(challenger.requests, policy.min_requests)
    allowed = champion.error_rate + policy.max_error_rate_excess
    if challenger.errors and challenger.errors / judged_over > allowed:
        failed.append(
            f"error rate {challenger.error_rate:.2%} ({challenger.errors} of "
            f"{challenger.requests}) exceeds the champion's {champion.error_rate:.2%} by more "
            f"than {policy.max_error_rate_excess:.2%}"
        )
    enough = challenger.requests >= policy.min_requests
    if enough and challenger.p99_ms is not None and champion.p99_ms is not None:
        bound = champion.p99_ms * policy.max_p99_ratio + policy.p99_slack_ms
        measured = sum(challenger.latency_buckets)
        slower = requests_slower_than(challenger.latency_buckets, bound)
        if _lower_bound(slower, measured) > P99_TAIL:
            failed.append(
                f"p99 latency {challenger.p99_ms:.1f} ms is over {bound:.1f} ms (champion "
                f"{champion.p99_ms:.1f} ms x {policy.max_p99_ratio} + {policy.p99_slack_ms} ms): "
                f"{slower:.0f} of {measured} requests slower, over 1% with 95% confidence"
            )
    shadow = evidence.shadow
    if shadow is not None and shadow.rows >= policy.min_requests:
        if shadow.agreement < policy.min_agreement:
            failed.append(
                f"agreement {shadow.agreement:.1%} on {shadow.rows} records is below "
                f"{policy.min_agreement:.1%}"
            )
        if shadow.score_shift > policy.max_score_shift:
            failed.append(
                f"mean score shift {shadow.score_shift:.3f} is over {policy.max_score_shift}"
            )
        if shadow.distribution_distance > policy.max_distribution_distance:
            failed.append(
                f"score distributions {shadow.distribution_distance:.3f} apart (Hellinger), "
                f"over {policy.max_distribution_distance}"
            )
    labelled = evidence.labelled
    if (
        labelled is not None
        and labelled.labels >= max(policy.min_labels, 1)
        and labelled.difference.high < -policy.max_performance_loss
    ):
        failed.append(
            f"{labelled.metric} worse than the champion's on {labelled.labels} labels: "
            f"difference {_interval(labelled.difference)}"
        )
    return failed


P99_TAIL = 0.01
"""The share of requests a 99th percentile leaves above it."""


def _lower_bound(slower: float, requests: int) -> float:
    """The one-sided 95% lower bound (Wilson score) of the share of slower requests.

    ``slower`` is read from buckets and may be fractional; its whole part is counted (the
    bound errs towards keeping the challenger). 0 without requests.
    """
    if requests <= 0:
        return 0.0
    test = stats.binomtest(math.floor(slower), requests, alternative="greater")
    return float(test.proportion_ci(confidence_level=0.95, method="wilson").low)


def _missing_evidence(evidence: RolloutEvidence, policy: RolloutPolicy) -> list[str]:
    missing = []
    if evidence.challenger.requests < policy.min_requests:
        missing.append(f"{evidence.challenger.requests} of {policy.min_requests} requests")
    if evidence.seconds_in_stage < policy.min_seconds:
        missing.append(f"{evidence.seconds_in_stage:.0f} of {policy.min_seconds:.0f} seconds")
    if evidence.stage == "shadow" and evidence.shadow is None:
        missing.append("no record scored by both models yet")
    if evidence.stage == "canary" and policy.min_labels:
        labels = evidence.labelled.labels if evidence.labelled is not None else 0
        if labels < policy.min_labels:
            missing.append(f"{labels} of {policy.min_labels} labels")
    return missing


def _held(evidence: RolloutEvidence) -> list[str]:
    challenger, champion = evidence.challenger, evidence.champion
    held = [
        f"{challenger.requests} requests in {evidence.seconds_in_stage:.0f} s, error rate "
        f"{challenger.error_rate:.2%} (champion {champion.error_rate:.2%})"
    ]
    if challenger.p99_ms is not None and champion.p99_ms is not None:
        held.append(f"p99 {challenger.p99_ms:.1f} ms (champion {champion.p99_ms:.1f} ms)")
    if evidence.shadow is not None:
        shadow = evidence.shadow
        held.append(
            f"agreement {shadow.agreement:.1%}, score shift {shadow.score_shift:.3f}, "
            f"distance {shadow.distribution_distance:.3f} on {shadow.rows} records"
        )
    if evidence.labelled is not None:
        labelled = evidence.labelled
        held.append(
            f"{labelled.metric} difference {_interval(labelled.difference)} on "
            f"{labelled.labels} labels"
        )
    return held


def _interval(interval: Interval) -> str:
    return f"{interval.point:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]"


def compare_scores(
    champion_decisions: np.ndarray,
    challenger_decisions: np.ndarray,
    champion_scores: np.ndarray,
    challenger_scores: np.ndarray,
    bins: int = 10,
) -> ShadowComparison:
    """Compare two models on the same records.

    Args:
        champion_decisions: what the champion decided per record (a class, or a bin).
        challenger_decisions: the same for the challenger.
        champion_scores: the champion's score per record (positive-class probability, or the
            predicted value).
        challenger_scores: the challenger's, on the same records in the same order.
        bins: the score distributions are compared on this many bins at the champion's
            quantiles, so the distance does not depend on the scores' scale.

    Returns:
        Agreement, mean absolute score shift and the Hellinger distance between the two
        score histograms.

    Raises:
        ValueError: if the arrays differ in length or are empty.

    """
    arrays = (champion_decisions, challenger_decisions, champion_scores, challenger_scores)
    lengths = {len(array) for array in arrays}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"both models' decisions and scores on the same records: {lengths}")
    champion = np.asarray(champion_scores, dtype=float)
    challenger = np.asarray(challenger_scores, dtype=float)
    edges = np.unique(np.quantile(champion, np.linspace(0, 1, bins + 1)[1:-1]))
    share = [
        np.bincount(np.searchsorted(edges, scores, side="right"), minlength=len(edges) + 1)
        / len(scores)
        for scores in (champion, challenger)
    ]
    hellinger = float(np.sqrt(0.5 * np.sum((np.sqrt(share[0]) - np.sqrt(share[1])) ** 2)))
    return ShadowComparison(
        rows=len(champion),
        agreement=float(
            np.mean(np.asarray(champion_decisions) == np.asarray(challenger_decisions))
        ),
        score_shift=float(np.mean(np.abs(challenger - champion))),
        distribution_distance=hellinger,
    )


# --------------------------------------------------------------------------------------------
# From what the endpoint recorded to the evidence the rules judge
# --------------------------------------------------------------------------------------------


def traffic_of(counts: VersionCounts) -> VersionTraffic:
    """One version's stage counts (summed over replicas) as the rules read them."""
    return VersionTraffic(counts.requests, counts.errors, tuple(counts.latency_buckets))


def _decisions(
    strategy: TaskStrategy, champion: np.ndarray, challenger: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """What each model decided per record: its class, or the bin of its value.

    A value's bins are the champion's deciles, so "the same decision" means the same tenth of
    the champion's range of answers, whatever the scale of the target.
    """
    if strategy.has_classes:
        return champion.astype(str), challenger.astype(str)
    champion_values, challenger_values = champion.astype(float), challenger.astype(float)
    edges = np.unique(np.quantile(champion_values, np.linspace(0, 1, 11)[1:-1]))
    return np.searchsorted(edges, champion_values), np.searchsorted(edges, challenger_values)


def shadow_comparison(pairs: pd.DataFrame, task: Task) -> ShadowComparison | None:
    """The two models on the records both scored (a :meth:`FeedbackStore.shadow_pairs` frame).

    Scores are the positive-class probability (binary) or the predicted value (regression); a
    multiclass log keeps no single score per record, so there only the agreement of the classes
    is measured (shift and distance are 0).

    Returns:
        The comparison, or ``None`` before any record was scored by both.

    """
    if pairs.empty:
        return None
    strategy = strategy_for(task)
    champion = pairs["champion_prediction"].to_numpy(dtype=object)
    challenger = pairs["challenger_prediction"].to_numpy(dtype=object)
    if strategy.has_classes and task != "binary":
        champion_scores = challenger_scores = np.zeros(len(pairs))
    elif strategy.has_classes:
        champion_scores = pairs["champion_score"].to_numpy(dtype=float)
        challenger_scores = pairs["challenger_score"].to_numpy(dtype=float)
    else:
        champion_scores, challenger_scores = champion.astype(float), challenger.astype(float)
    return compare_scores(
        *_decisions(strategy, champion, challenger), champion_scores, challenger_scores
    )


def live_metric(frame: pd.DataFrame, task: Task, positive_class: Any = None) -> str:
    """The metric two versions are compared on in live traffic.

    The task's gate metric when labelled records give it (binary ``roc_auc``), else the task's
    first live metric (``accuracy`` for multiclass, ``mae`` for regression).

    Raises:
        ValueError: when the labels cannot be scored (see ``TaskStrategy.live_metrics``).

    """
    strategy = strategy_for(task)
    available = strategy.live_metrics(frame, positive_class)
    return strategy.gate_metric if strategy.gate_metric in available else next(iter(available))


def labelled_comparison(
    champion: pd.DataFrame,
    challenger: pd.DataFrame,
    task: Task,
    positive_class: Any = None,
    paired: bool = False,
    n_resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> LabelledComparison | None:
    """Challenger minus champion on labelled records, with a bootstrap interval.

    Paired (shadow: both scored the same records, in the same order) the same resamples are
    drawn for both, so the interval is of the difference on the same records; unpaired
    (canary: each answered its own requests) each version's records are resampled on their
    own, as two independent samples.

    Args:
        champion: the champion's labelled records (``prediction``, ``score``, ``label``).
        challenger: the challenger's.
        task: the model's task.
        positive_class: the class ``score`` is the probability of (binary only).
        paired: whether row ``i`` of both frames is the same record.
        n_resamples: bootstrap resamples.
        confidence: the interval's coverage.
        seed: the resamples' seed (the same evidence gives the same interval).

    Returns:
        The comparison (a loss's difference negated, so higher is better for the challenger),
        or ``None`` while either side has no labelled record.

    Raises:
        ValueError: if paired frames differ in length, or the labels cannot be scored.

    """
    if champion.empty or challenger.empty:
        return None
    if paired and len(champion) != len(challenger):
        raise ValueError(f"paired records: {len(champion)} and {len(challenger)}")
    strategy = strategy_for(task)
    metric = live_metric(pd.concat([champion, challenger], ignore_index=True), task, positive_class)
    sign = -1.0 if metric in strategy.lower_is_better else 1.0

    def value(frame: pd.DataFrame) -> float:
        return strategy.live_metrics(frame, positive_class).get(metric, math.nan)

    check_bootstrap_arguments(len(champion), n_resamples, confidence)
    point = sign * (value(challenger) - value(champion))
    champion_rows = bootstrap_indices(len(champion), n_resamples, seed)
    challenger_rows = (
        champion_rows if paired else bootstrap_indices(len(challenger), n_resamples, seed + 1)
    )
    resampled = np.array(
        [
            sign * (value(challenger.iloc[mine]) - value(champion.iloc[theirs]))
            for mine, theirs in zip(challenger_rows, champion_rows, strict=True)
        ]
    )
    labels = len(champion) if paired else min(len(champion), len(challenger))
    return LabelledComparison(labels, metric, percentile_interval(point, resampled, confidence))


@dataclasses.dataclass(frozen=True)
class StageUnderWay:
    """The stage of a rollout that evidence is gathered for (what the registry keeps of it).

    Attributes:
        challenger: the version being rolled out.
        stage: ``shadow`` or ``canary``.
        rollout_id: names the rollout's evidence on disk.
        stage_since: when the stage began (unix seconds).

    """

    challenger: str
    stage: RolloutStage
    rollout_id: str
    stage_since: float


def gather_evidence(
    state: StageUnderWay,
    champion_version: str,
    model_name: str,
    traffic_dir: Path,
    feedback: FeedbackStore,
    task: Task,
    positive_class: Any,
    now: float,
) -> RolloutEvidence:
    """Everything the endpoint recorded of the rollout's current stage, as the rules read it.

    The stage's counts per version (summed over the replicas' files), in shadow the paired
    comparison of the records both scored, and the labelled comparison: paired in shadow (on
    the records both scored whose answer was labelled), unpaired in canary (each version's
    answered records). Only what happened since the stage began counts.

    Args:
        state: the rollout under way (challenger, stage, since when, its evidence's id).
        champion_version: the champion beside it.
        model_name: the registered model.
        traffic_dir: where the replicas write their stage counts.
        feedback: the prediction log (answers, shadow scores, labels).
        task: the model's task.
        positive_class: the class ``score`` is the probability of (binary only).
        now: the current time (unix seconds).

    """
    since = dt.datetime.fromtimestamp(state.stage_since, dt.UTC)

    def counts(version: str) -> VersionTraffic:
        return traffic_of(
            read_stage_counts(traffic_dir, model_name, state.rollout_id, state.stage, version)
        )

    shadow, labelled = None, None
    if state.stage == "shadow":
        pairs = feedback.shadow_pairs(model_name, champion_version, state.challenger, since)
        shadow = shadow_comparison(pairs, task)
        marked = pairs[pairs["label"].notna()]
        labelled = labelled_comparison(
            _as_answers(marked, "champion"),
            _as_answers(marked, "challenger"),
            task,
            positive_class,
            paired=True,
        )
    else:
        labelled = labelled_comparison(
            feedback.labelled(model_version=champion_version, since=since, model_name=model_name),
            feedback.labelled(model_version=state.challenger, since=since, model_name=model_name),
            task,
            positive_class,
        )
    return RolloutEvidence(
        stage=state.stage,
        seconds_in_stage=max(0.0, now - state.stage_since),
        champion=counts(champion_version),
        challenger=counts(state.challenger),
        shadow=shadow,
        labelled=labelled,
    )


def _as_answers(pairs: pd.DataFrame, side: str) -> pd.DataFrame:
    """One side of the paired records as a labelled frame (``prediction``, ``score``, ``label``)."""
    return pd.DataFrame(
        {
            "prediction": pairs[f"{side}_prediction"].to_numpy(dtype=object),
            "score": pairs[f"{side}_score"].to_numpy(dtype=float),
            "label": pairs["label"].to_numpy(dtype=object),
        }
    )


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """The rollout's policy and how often the rollout sensor looks.

    Attributes:
        policy: the minimum evidence and the bounds (:class:`RolloutPolicy`).
        interval_s: seconds between rollout sensor ticks.
        history_s: the sensor also records a judgement this often while the rollout waits,
            so the rollout's history shows how the evidence grew.

    """

    policy: RolloutPolicy = dataclasses.field(default_factory=RolloutPolicy)
    interval_s: int = 30
    history_s: float = 600.0


def load_rollout_settings(environ: Mapping[str, str] | None = None) -> RolloutSettings:
    """Read the rollout settings from the environment (defaults in :class:`RolloutSettings`).

    Every field of :class:`RolloutPolicy` is ``MLPLATFORM_ROLLOUT_<FIELD>`` (``..._MIN_REQUESTS``,
    ``..._CANARY_SHARE``, ``..._MAX_P99_RATIO``, ...); the sensor's are
    ``MLPLATFORM_ROLLOUT_INTERVAL_S`` and ``MLPLATFORM_ROLLOUT_HISTORY_S``.

    Raises:
        ValueError: if a value is not a number, or the policy it gives is invalid.

    """
    env = os.environ if environ is None else environ
    defaults = RolloutSettings()

    def number(field: str, default: float) -> float:
        name = f"MLPLATFORM_ROLLOUT_{field.upper()}"
        raw = env.get(name)
        if not raw:
            return default
        try:
            return type(default)(float(raw))
        except ValueError:
            raise ValueError(f"{name} must be a number, got {raw!r}") from None

    policy = RolloutPolicy(
        **{
            field.name: number(field.name, getattr(defaults.policy, field.name))
            for field in dataclasses.fields(RolloutPolicy)
        }
    )
    interval_s = int(number("interval_s", defaults.interval_s))
    if interval_s < 1:
        raise ValueError(f"MLPLATFORM_ROLLOUT_INTERVAL_S must be positive, got {interval_s}")
    return RolloutSettings(policy, interval_s, number("history_s", defaults.history_s))


# --------------------------------------------------------------------------------------------
# The rollout sensor's decision
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutCursor(SensorCursor):
    """The rollout sensor's memory between ticks (JSON in the sensor cursor).

    Attributes:
        rollout_id: the rollout judged last.
        stage: its stage then.
        verdict: the verdict of the last tick (``wait: ...``), to record a change once.
        run_key: the run key of the last run requested.
        requested_at: when a run was last requested (unix seconds).

    """

    rollout_id: str | None = None
    stage: str | None = None
    verdict: str | None = None
    run_key: str | None = None
    requested_at: float | None = None


@dataclasses.dataclass(frozen=True)
class RolloutTick:
    """What the rollout sensor does on one tick.

    Attributes:
        run: whether to request a ``rollout_job`` run.
        run_key: its run key (one per rollout, stage and verdict, or per history look).
        reason: why, with the verdict (shown on the tick).
        cursor: the cursor to store.
        changed: whether the verdict differs from the last tick's (then it is recorded).

    """

    run: bool
    run_key: str | None
    reason: str
    cursor: RolloutCursor
    changed: bool


def decide_rollout_tick(
    rollout_id: str,
    verdict: RolloutVerdict,
    stage: str,
    cursor: RolloutCursor,
    now: float,
    run_in_progress: bool,
    history_s: float,
) -> RolloutTick:
    """Whether the rollout sensor requests a ``rollout_job`` run on this tick.

    A run is requested when the verdict is ``advance`` or ``roll_back`` (the run judges again
    and applies it), once per rollout, stage and verdict, and, while the rollout waits, every
    ``history_s`` seconds so its history shows how the evidence grew. Nothing is requested while
    a run that deploys the endpoint (this job included) is queued or running.

    Args:
        rollout_id: the rollout under way.
        verdict: the rules' verdict on this tick's evidence.
        stage: the stage the rollout is in.
        cursor: the sensor's memory from the previous tick.
        now: the current time (unix seconds).
        run_in_progress: whether a run that deploys the endpoint is queued or running.
        history_s: how often a waiting rollout is judged by a run, for its history.

    """
    summary = f"{verdict.action}: {'; '.join(verdict.reasons)}"
    same_rollout = (cursor.rollout_id, cursor.stage) == (rollout_id, stage)
    changed = not same_rollout or cursor.verdict != summary
    state = f"Rollout {rollout_id} in {stage}: {summary}"
    kept = dataclasses.replace(cursor, rollout_id=rollout_id, stage=stage, verdict=summary)
    if not same_rollout:
        kept = RolloutCursor(rollout_id=rollout_id, stage=stage, verdict=summary)
    if run_in_progress:
        return RolloutTick(False, None, f"{state} (a deploy is under way)", kept, changed)
    if verdict.action != "wait":
        run_key = f"rollout-{rollout_id}-{stage}-{verdict.action}"
        if cursor.run_key == run_key:
            return RolloutTick(False, None, f"{state} (already requested)", kept, changed)
    else:
        last = cursor.requested_at if same_rollout and cursor.requested_at else None
        if last is not None and now - last < history_s:
            return RolloutTick(False, None, state, kept, changed)
        if last is None and not same_rollout:
            # A new rollout or stage: its first look is recorded by the tick, a run follows later.
            kept = dataclasses.replace(kept, requested_at=now)
            return RolloutTick(False, None, state, kept, changed)
        run_key = f"rollout-{rollout_id}-{stage}-history-{now:.0f}"
    cursor_after = dataclasses.replace(kept, run_key=run_key, requested_at=now)
    return RolloutTick(True, run_key, state, cursor_after, changed)
