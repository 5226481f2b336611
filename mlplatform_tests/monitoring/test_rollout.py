"""The rollout rules: wait, advance or roll back on live evidence, at their boundaries."""

import dataclasses
import math

import numpy as np
import pytest

from mlplatform.monitoring.evidence import VersionCounts
from mlplatform.monitoring.rollout import (
    LabelledComparison,
    RolloutEvidence,
    RolloutPolicy,
    ShadowComparison,
    VersionTraffic,
    compare_scores,
    decide_rollout,
)
from mlplatform.tasks.metrics import Interval


def _traffic(requests: int, errors: int = 0, slow: int = 0, slow_ms: float = 50.0):
    """``requests`` scored in 1 ms but ``slow`` of them, scored in ``slow_ms``."""
    counts = VersionCounts()
    counts.add(requests - slow, errors, 1.0)
    counts.add(slow, 0, slow_ms)
    return VersionTraffic(requests, errors, tuple(counts.latency_buckets))


POLICY = RolloutPolicy(min_requests=100, min_seconds=60, min_labels=50)
# p99 10 ms exactly, as read from buckets: 890 requests in (0.5, 1], 100 in (5, 10], 10 above.
_CHAMPION_COUNTS = VersionCounts()
for _requests, _ms in ((890, 1.0), (100, 10.0), (10, 20.0)):
    _CHAMPION_COUNTS.add(_requests, 0, _ms)
CHAMPION = VersionTraffic(1000, 0, tuple(_CHAMPION_COUNTS.latency_buckets))
AGREEING = ShadowComparison(rows=100, agreement=0.97, score_shift=0.02, distribution_distance=0.05)
BETTER = LabelledComparison(50, "roc_auc", Interval(point=0.02, low=-0.01, high=0.05))


def _evidence(stage="shadow", seconds=60.0, challenger=None, shadow=AGREEING, labelled=None):
    return RolloutEvidence(
        stage=stage,
        seconds_in_stage=seconds,
        champion=CHAMPION,
        challenger=challenger or _traffic(100),
        shadow=shadow,
        labelled=labelled,
    )


def test_a_healthy_shadow_advances_to_canary_once_it_has_its_minimum():
    verdict = decide_rollout(_evidence(), POLICY)
    assert (verdict.action, verdict.stage) == ("advance", "canary")
    assert any("agreement 97.0%" in reason for reason in verdict.reasons)


@pytest.mark.parametrize(
    ("evidence", "missing"),
    [
        (_evidence(seconds=59.0), "59 of 60 seconds"),
        (_evidence(challenger=_traffic(99, 0)), "99 of 100 requests"),
        (_evidence(shadow=None), "no record scored by both models yet"),
    ],
)
def test_without_its_minimum_evidence_a_stage_waits(evidence, missing):
    verdict = decide_rollout(evidence, POLICY)
    assert (verdict.action, verdict.stage, verdict.reasons) == ("wait", "shadow", (missing,))


def test_a_canary_is_promoted_only_with_enough_labels_that_do_not_show_it_worse():
    canary = _evidence(stage="canary", shadow=None, labelled=BETTER)
    assert decide_rollout(canary, POLICY).stage == "promoted"

    few = LabelledComparison(49, "roc_auc", BETTER.difference)
    verdict = decide_rollout(_evidence(stage="canary", shadow=None, labelled=few), POLICY)
    assert (verdict.action, verdict.reasons) == ("wait", ("49 of 50 labels",))
    none = decide_rollout(_evidence(stage="canary", shadow=None), POLICY)
    assert none.reasons == ("0 of 50 labels",)

    without_labels = RolloutPolicy(min_requests=100, min_seconds=60, min_labels=0)
    assert decide_rollout(_evidence(stage="canary", shadow=None), without_labels).stage == (
        "promoted"
    )


def test_labelled_performance_worse_with_confidence_rolls_back_at_the_bound():
    at_bound = LabelledComparison(50, "roc_auc", Interval(-0.03, -0.05, 0.0))
    assert decide_rollout(_evidence(stage="canary", labelled=at_bound), POLICY).action == "advance"
    worse = LabelledComparison(50, "roc_auc", Interval(-0.03, -0.05, -0.001))
    verdict = decide_rollout(_evidence(stage="canary", labelled=worse), POLICY)
    assert (verdict.action, verdict.stage) == ("roll_back", "rolled_back")
    assert verdict.reasons == (
        "roc_auc worse than the champion's on 50 labels: difference -0.0300 [-0.0500, -0.0010]",
    )
    tolerant = RolloutPolicy(
        min_requests=100, min_seconds=60, min_labels=50, max_performance_loss=0.01
    )
    assert decide_rollout(_evidence(stage="canary", labelled=worse), tolerant).action == "advance"


def test_errors_roll_back_as_soon_as_the_minimum_of_requests_cannot_dilute_them():
    # 1% allowed over the champion's 0%: 2 errors are more than 1% of the 100 minimum at once,
    # even after only 10 requests; 1 error is not, until the rate is measured on 100 or more.
    two_early = decide_rollout(_evidence(challenger=_traffic(10, 2)), POLICY)
    assert two_early.action == "roll_back"
    assert two_early.reasons[0].startswith("error rate 20.00% (2 of 10) exceeds")
    one_early = decide_rollout(_evidence(challenger=_traffic(10, 1)), POLICY)
    assert one_early.action == "wait"
    assert decide_rollout(_evidence(challenger=_traffic(100, 1)), POLICY).action == ("advance")
    assert decide_rollout(_evidence(challenger=_traffic(150, 2)), POLICY).action == ("roll_back")


def test_the_champions_own_errors_raise_the_bound():
    flaky_champion = RolloutEvidence("shadow", 60.0, _traffic(1000, 50), _traffic(100, 5), AGREEING)
    assert decide_rollout(flaky_champion, POLICY).action == "advance"  # 5% vs 5%


def test_p99_latency_rolls_back_when_more_than_1_percent_is_credibly_over_the_bound():
    assert CHAMPION.p99_ms == 10.0  # bound 10 x 1.5 + 5 = 20 ms
    # 2 of 100 over it: a pause in a small sample, not a slow challenger (its p99 is over).
    paused = _evidence(challenger=_traffic(100, slow=2))
    assert paused.challenger.p99_ms > 20.0
    assert decide_rollout(paused, POLICY).action == "advance"
    # 3 of 100: more than 1% with 95% confidence.
    slow = decide_rollout(_evidence(challenger=_traffic(100, slow=3)), POLICY)
    assert (slow.action, slow.reasons) == (
        "roll_back",
        (
            "p99 latency 41.7 ms is over 20.0 ms (champion 10.0 ms x 1.5 + 5.0 ms): "
            "3 of 100 requests slower, over 1% with 95% confidence",
        ),
    )
    # Slow throughout, but before the minimum of requests: not judged yet.
    early = _evidence(challenger=_traffic(99, slow=99))
    assert decide_rollout(early, POLICY).action == "wait"
    # On more requests a smaller share is credible: 20 of 1000 (2%) is.
    assert decide_rollout(_evidence(challenger=_traffic(1000, slow=20)), POLICY).action == (
        "roll_back"
    )
    assert decide_rollout(_evidence(challenger=_traffic(1000, slow=12)), POLICY).action == (
        "advance"
    )


@pytest.mark.parametrize(
    ("shadow", "rule"),
    [
        (ShadowComparison(100, 0.89, 0.02, 0.05), "agreement 89.0% on 100 records is below 90.0%"),
        (ShadowComparison(100, 0.97, 0.11, 0.05), "mean score shift 0.110 is over 0.1"),
        (
            ShadowComparison(100, 0.97, 0.02, 0.21),
            "score distributions 0.210 apart (Hellinger), over 0.2",
        ),
    ],
)
def test_shadow_disagreement_rolls_back_once_enough_records_are_compared(shadow, rule):
    verdict = decide_rollout(_evidence(shadow=shadow), POLICY)
    assert (verdict.action, verdict.reasons) == ("roll_back", (rule,))
    fewer = dataclasses.replace(shadow, rows=99)
    assert decide_rollout(_evidence(shadow=fewer), POLICY).action == "advance"


def test_every_failed_rule_is_named():
    everything_wrong = _evidence(
        challenger=_traffic(100, 10, slow=10),
        shadow=ShadowComparison(100, 0.5, 0.5, 0.9),
    )
    assert len(decide_rollout(everything_wrong, POLICY).reasons) == 5


def test_only_shadow_and_canary_are_decided_and_the_policy_is_checked():
    with pytest.raises(ValueError, match="promoted"):
        decide_rollout(_evidence(stage="promoted"), POLICY)
    with pytest.raises(ValueError, match="canary_share"):
        RolloutPolicy(canary_share=1.0)
    with pytest.raises(ValueError, match="min_requests"):
        RolloutPolicy(min_requests=-1)
    with pytest.raises(ValueError, match="max_p99_ratio"):
        RolloutPolicy(max_p99_ratio=0.9)


def test_compare_scores_on_the_same_records():
    champion = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    challenger = champion + np.array([0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, -0.1])
    comparison = compare_scores(champion > 0.5, challenger > 0.5, champion, challenger, bins=2)

    assert comparison.rows == 8
    assert comparison.agreement == 7 / 8  # 0.4 -> 0.7 crosses the threshold
    assert comparison.score_shift == pytest.approx(0.4 / 8)
    # Two bins split at the champion's median (0.5): champion 4|4, challenger 3|5.
    expected = math.sqrt(
        0.5
        * ((math.sqrt(4 / 8) - math.sqrt(3 / 8)) ** 2 + (math.sqrt(4 / 8) - math.sqrt(5 / 8)) ** 2)
    )
    assert comparison.distribution_distance == pytest.approx(expected)

    same = compare_scores(champion > 0.5, champion > 0.5, champion, champion)
    assert (same.agreement, same.score_shift, same.distribution_distance) == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same records"):
        compare_scores(champion, champion[:3], champion, champion)
