"""From what the endpoint recorded to the rollout's evidence: stage counts written by replicas,
shadow pairs and labels in a real prediction log, bootstrap intervals, settings, the sensor's
decision. Real files and SQLite; only the clock is controlled.
"""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, mean_absolute_error, roc_auc_score

from mlplatform.monitoring.evidence import (
    VersionCounts,
    bucket_quantile_ms,
    requests_slower_than,
    write_counts,
)
from mlplatform.monitoring.feedback import FeedbackStore, PredictionRecord
from mlplatform.monitoring.rollout import (
    RolloutCursor,
    RolloutPolicy,
    RolloutSettings,
    RolloutVerdict,
    StageUnderWay,
    decide_rollout,
    decide_rollout_tick,
    gather_evidence,
    labelled_comparison,
    live_metric,
    load_rollout_settings,
    shadow_comparison,
    traffic_of,
)
from mlplatform_tests.support import T0, scored


def _answers(labels, scores, threshold=0.5):
    return pd.DataFrame(
        {"prediction": (scores >= threshold).astype(int), "score": scores, "label": labels}
    )


def test_traffic_of_sums_replicas_and_reads_p99_from_buckets():
    counts = VersionCounts()
    counts.add(98, 1, 2.0)
    counts.add(2, 0, 40.0)  # the slowest 2%: the 99th percentile is among them
    traffic = traffic_of(counts)
    assert (traffic.requests, traffic.errors, traffic.error_rate) == (100, 1, 0.01)
    assert 25.0 < traffic.p99_ms <= 50.0
    assert traffic_of(VersionCounts()).p99_ms is None


def test_requests_slower_than_a_bound_are_read_from_the_buckets_as_the_quantiles_are():
    counts = VersionCounts()
    counts.add(90, 0, 2.0)  # (1, 2.5]
    counts.add(10, 0, 20.0)  # (10, 25]
    counts.add(4, 0, 9000.0)  # above the last bound, 5000 ms
    buckets = counts.latency_buckets
    assert requests_slower_than(buckets, 25.0) == 4
    assert requests_slower_than(buckets, 10.0) == 14
    assert requests_slower_than(buckets, 17.5) == 9  # half of (10, 25] is above 17.5
    assert requests_slower_than(buckets, 1.75) == 59  # half of (1, 2.5] as well
    assert requests_slower_than(buckets, 6000.0) == 0  # past the last bound: a lower bound
    # Read back at the quantile's own value, the share above it is the quantile's complement.
    p90 = bucket_quantile_ms(buckets, 0.9)
    assert requests_slower_than(buckets, p90) == pytest.approx(104 * 0.1)


def test_shadow_comparison_per_task():
    assert shadow_comparison(pd.DataFrame(columns=["champion_prediction"]), "binary") is None
    pairs = pd.DataFrame(
        {
            "champion_prediction": [1, 0, 0, 1],
            "champion_score": [0.9, 0.1, 0.2, 0.8],
            "challenger_prediction": [1, 0, 1, 1],
            "challenger_score": [0.7, 0.1, 0.6, 0.8],
        }
    )
    binary = shadow_comparison(pairs, "binary")
    assert (binary.rows, binary.agreement) == (4, 0.75)
    assert binary.score_shift == pytest.approx((0.2 + 0 + 0.4 + 0) / 4)
    # Multiclass logs no single score: only the classes' agreement is measured.
    multi = shadow_comparison(pairs.assign(champion_score=np.nan), "multiclass")
    assert (multi.agreement, multi.score_shift, multi.distribution_distance) == (0.75, 0.0, 0.0)
    # Regression: the same decision is the same decile of the champion's values.
    values = np.arange(100.0)
    regression = shadow_comparison(
        pd.DataFrame({"champion_prediction": values, "challenger_prediction": values + 0.1}),
        "regression",
    )
    assert regression.score_shift == pytest.approx(0.1)
    assert regression.agreement >= 0.9


def test_the_live_metric_is_the_gate_metric_when_labels_give_it():
    labels, scores = scored(200, seed=1)
    assert live_metric(_answers(labels, scores), "binary") == "roc_auc"
    # One labelled class: no roc_auc, the task's first live metric instead.
    assert live_metric(_answers(np.zeros(5, dtype=int), scores[:5]), "binary") == "accuracy"
    frame = pd.DataFrame({"prediction": [1.0, 2.0], "label": [1.5, 2.0], "score": [1.0, 2.0]})
    assert live_metric(frame, "regression") == "mae"


def test_paired_labelled_comparison_on_the_same_records():
    labels, champion = scored(400, seed=2, signal=1.0)
    _, challenger = scored(400, seed=2, signal=2.5)  # same labels, sharper scores
    result = labelled_comparison(
        _answers(labels, champion), _answers(labels, challenger), "binary", paired=True
    )
    assert (result.labels, result.metric) == (400, "roc_auc")
    expected = roc_auc_score(labels, challenger) - roc_auc_score(labels, champion)
    assert result.difference.point == pytest.approx(expected)
    assert 0 < result.difference.low < result.difference.point < result.difference.high
    # The same evidence gives the same interval.
    again = labelled_comparison(
        _answers(labels, champion), _answers(labels, challenger), "binary", paired=True
    )
    assert again == result
    with pytest.raises(ValueError, match="paired records"):
        labelled_comparison(
            _answers(labels, champion), _answers(labels[:5], challenger[:5]), "binary", paired=True
        )


def test_unpaired_comparison_is_wider_than_paired_on_the_same_records():
    labels, champion = scored(300, seed=3, signal=1.5)
    _, challenger = scored(300, seed=3, signal=1.6)
    paired = labelled_comparison(
        _answers(labels, champion), _answers(labels, challenger), "binary", paired=True
    )
    unpaired = labelled_comparison(
        _answers(labels, champion), _answers(labels, challenger), "binary"
    )
    assert paired.difference.point == unpaired.difference.point
    assert unpaired.difference.width > paired.difference.width
    assert unpaired.labels == 300


def test_a_loss_is_negated_so_higher_is_better_for_the_challenger():
    truth = np.linspace(0, 10, 50)
    champion = pd.DataFrame({"prediction": truth + 1.0, "label": truth, "score": truth + 1.0})
    challenger = pd.DataFrame({"prediction": truth + 0.5, "label": truth, "score": truth + 0.5})
    result = labelled_comparison(champion, challenger, "regression", paired=True)
    assert result.metric == "mae"
    # MAE 1.0 -> 0.5: the challenger is better by 0.5, reported as +0.5.
    assert result.difference.point == pytest.approx(0.5)
    assert result.difference.low == pytest.approx(0.5)


def test_without_labels_on_either_side_there_is_no_comparison():
    labels, scores = scored(10)
    empty = _answers(labels, scores).iloc[:0]
    assert labelled_comparison(empty, _answers(labels, scores), "binary") is None
    assert labelled_comparison(_answers(labels, scores), empty, "binary") is None


def _record(request, index, version, prediction, score, at):
    return PredictionRecord(request, index, "loans", version, prediction, score, at)


def test_gather_shadow_evidence_from_replica_files_and_the_prediction_log(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    labels, champion = scored(300, seed=4, signal=1.5)
    _, challenger = scored(300, seed=4, signal=1.6)
    # Answers before the stage began do not count.
    store.log_predictions([_record("old", 0, "1", 1, 0.9, T0 - 10)])
    store.log_shadow_predictions([_record("old", 0, "2", 0, 0.1, T0 - 10)])
    store.log_predictions(
        _record(f"r{i}", 0, "1", int(s >= 0.5), float(s), T0 + i) for i, s in enumerate(champion)
    )
    store.log_shadow_predictions(
        _record(f"r{i}", 0, "2", int(s >= 0.5), float(s), T0 + i) for i, s in enumerate(challenger)
    )
    store.add_labels([{"request_id": f"r{i}", "label": int(labels[i])} for i in range(250)])
    for replica, (requests, errors) in {"a": (200, 0), "b": (100, 1)}.items():
        for version in ("1", "2"):
            counts = VersionCounts()
            counts.add(requests, errors if version == "2" else 0, 3.0)
            write_counts(tmp_path / "traffic", "loans", "v2-1", "shadow", version, replica, counts)
    stage = StageUnderWay("2", "shadow", "v2-1", T0)
    evidence = gather_evidence(
        stage, "1", "loans", tmp_path / "traffic", store, "binary", 1, now=T0 + 400
    )
    assert evidence.seconds_in_stage == 400
    assert (evidence.champion.requests, evidence.champion.errors) == (300, 0)
    assert (evidence.challenger.requests, evidence.challenger.errors) == (300, 1)
    assert evidence.shadow.rows == 300
    assert evidence.labelled.labels == 250
    expected = roc_auc_score(labels[:250], challenger[:250]) - roc_auc_score(
        labels[:250], champion[:250]
    )
    assert evidence.labelled.difference.point == pytest.approx(expected)
    verdict = decide_rollout(evidence, RolloutPolicy(min_requests=200, min_seconds=300))
    assert verdict.action == "advance", verdict.reasons


def test_gather_canary_evidence_compares_each_versions_answers(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 2, 400)
    champion_right = rng.random(400) < 0.9
    challenger_right = rng.random(400) < 0.6  # clearly worse
    rows = []
    for i in range(400):
        version, right = ("2", challenger_right[i]) if i % 2 else ("1", champion_right[i])
        predicted = int(truth[i]) if right else 1 - int(truth[i])
        rows.append(_record(f"r{i}", 0, version, predicted, None, T0 + i))
    store.log_predictions(rows)
    store.add_labels([{"request_id": f"r{i}", "label": int(truth[i])} for i in range(400)])
    stage = StageUnderWay("2", "canary", "v2-1", T0)
    evidence = gather_evidence(
        stage, "1", "loans", tmp_path / "traffic", store, "binary", 1, now=T0 + 500
    )
    assert evidence.shadow is None
    assert evidence.challenger.requests == 0  # no replica wrote counts
    labelled = evidence.labelled
    assert (labelled.metric, labelled.labels) == ("accuracy", 200)
    versions = store.labelled(model_name="loans")
    point = accuracy_score(
        *[versions[versions.model_version == "2"][c].astype(int) for c in ("label", "prediction")]
    ) - accuracy_score(
        *[versions[versions.model_version == "1"][c].astype(int) for c in ("label", "prediction")]
    )
    assert labelled.difference.point == pytest.approx(point)
    assert labelled.difference.high < 0
    verdict = decide_rollout(evidence, RolloutPolicy(min_labels=200))
    assert verdict.action == "roll_back"
    assert any("accuracy worse" in reason for reason in verdict.reasons)


def test_regression_evidence_uses_the_values_themselves():
    truth = np.linspace(1, 5, 40)
    champion = pd.DataFrame({"prediction": truth, "label": truth + 0.3, "score": truth})
    challenger = champion.assign(prediction=truth + 0.3, score=truth + 0.3)
    result = labelled_comparison(champion, challenger, "regression", paired=True)
    assert result.difference.point == pytest.approx(mean_absolute_error(truth + 0.3, truth) - 0.0)


def test_settings_from_the_environment():
    assert load_rollout_settings({}) == RolloutSettings()
    settings = load_rollout_settings(
        {
            "MLPLATFORM_ROLLOUT_MIN_REQUESTS": "50",
            "MLPLATFORM_ROLLOUT_CANARY_SHARE": "0.5",
            "MLPLATFORM_ROLLOUT_INTERVAL_S": "5",
            "MLPLATFORM_ROLLOUT_HISTORY_S": "60",
        }
    )
    assert settings.policy == dataclasses.replace(
        RolloutPolicy(), min_requests=50, canary_share=0.5
    )
    assert (settings.interval_s, settings.history_s) == (5, 60.0)
    assert isinstance(settings.policy.min_requests, int)
    with pytest.raises(ValueError, match="MLPLATFORM_ROLLOUT_MIN_LABELS must be a number"):
        load_rollout_settings({"MLPLATFORM_ROLLOUT_MIN_LABELS": "many"})
    with pytest.raises(ValueError, match="canary_share"):
        load_rollout_settings({"MLPLATFORM_ROLLOUT_CANARY_SHARE": "1.5"})
    with pytest.raises(ValueError, match="INTERVAL_S must be positive"):
        load_rollout_settings({"MLPLATFORM_ROLLOUT_INTERVAL_S": "0"})


WAIT = RolloutVerdict("wait", "shadow", ("10 of 200 requests",))
ADVANCE = RolloutVerdict("advance", "canary", ("all held",))
ROLL_BACK = RolloutVerdict("roll_back", "rolled_back", ("error rate 5%",))


def _tick(verdict, cursor=None, now=T0, busy=False, stage="shadow", rollout="v2-1"):
    cursor = cursor or RolloutCursor()
    return decide_rollout_tick(rollout, verdict, stage, cursor, now, busy, history_s=600)


def test_tick_requests_a_run_once_per_advance_or_roll_back():
    first = _tick(ADVANCE)
    assert (first.run, first.run_key, first.changed) == (True, "rollout-v2-1-shadow-advance", True)
    assert first.cursor.run_key == first.run_key and first.cursor.requested_at == T0
    again = _tick(ADVANCE, first.cursor, now=T0 + 30)
    assert (again.run, again.changed) == (False, False)
    assert "already requested" in again.reason
    # The next stage's verdict is a new request.
    canary = _tick(ADVANCE, again.cursor, now=T0 + 60, stage="canary")
    assert canary.run_key == "rollout-v2-1-canary-advance"
    back = _tick(ROLL_BACK, canary.cursor, now=T0 + 90, stage="canary")
    assert back.run_key == "rollout-v2-1-canary-roll_back"


def test_tick_waits_while_a_deploy_runs():
    busy = _tick(ROLL_BACK, busy=True)
    assert not busy.run and "a deploy is under way" in busy.reason
    assert busy.cursor.run_key is None  # asked again once the deploy is done
    assert _tick(ROLL_BACK, busy.cursor, now=T0 + 30).run


def test_a_waiting_rollout_is_judged_by_a_run_every_history_interval():
    first = _tick(WAIT)
    assert not first.run and first.changed and first.cursor.requested_at == T0
    quiet = _tick(WAIT, first.cursor, now=T0 + 599)
    assert (quiet.run, quiet.changed) == (False, False)
    due = _tick(WAIT, quiet.cursor, now=T0 + 600)
    assert due.run and due.run_key == f"rollout-v2-1-shadow-history-{T0 + 600:.0f}"
    changed = _tick(RolloutVerdict("wait", "shadow", ("20 of 200",)), due.cursor, now=T0 + 630)
    assert changed.changed and not changed.run


def test_the_cursor_survives_its_json_round_trip():
    cursor = _tick(ADVANCE).cursor
    assert RolloutCursor.parse(cursor.dump()) == cursor
    assert RolloutCursor.parse("not json") == RolloutCursor()
    assert math.isclose(RolloutCursor.parse(cursor.dump()).requested_at, T0)
