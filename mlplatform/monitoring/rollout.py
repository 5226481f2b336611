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
from typing import Literal

import numpy as np

from mlplatform.tasks.metrics import Interval

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
            challenger over noise).
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
        p99_ms: 99th percentile of its scoring latency, in milliseconds; ``None`` before any.

    """

    requests: int
    errors: int
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float:
        """Errors per request (0 before any request)."""
        return self.errors / self.requests if self.requests else 0.0


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
    requests), its p99 latency is over the bound (after the minimum of requests), in shadow its
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
        if challenger.p99_ms > bound:
            failed.append(
                f"p99 latency {challenger.p99_ms:.1f} ms is over {bound:.1f} ms (champion "
                f"{champion.p99_ms:.1f} ms x {policy.max_p99_ratio} + {policy.p99_slack_ms} ms)"
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
