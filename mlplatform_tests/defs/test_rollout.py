"""The rollout's control plane on a real registry, prediction log and Dagster instance.

Versions are registered without training (the rollout reads only the registry, the replicas'
stage counts and the prediction log); the evidence is written as the endpoint writes it.
"""

import json
import time
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from sklearn.linear_model import LogisticRegression

from mlplatform.cli import main
from mlplatform.definitions import defs
from mlplatform.defs.features import features, reference_profile
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.registry import ROLLOUT_DECISION_TAG
from mlplatform.defs.rollout import rollout_report, rollout_sensor
from mlplatform.demo.data import generate_loans
from mlplatform.model.pipeline import build_preprocessor, make_model_pipeline
from mlplatform.model.pyfunc import TabularModel
from mlplatform.model.registry import CHAMPION_ALIAS
from mlplatform.model.spec import infer_feature_spec
from mlplatform.monitoring.evidence import VersionCounts, write_counts
from mlplatform.monitoring.feedback import FeedbackStore, PredictionRecord
from mlplatform.monitoring.profiles import reference_profile_path, reference_sidecar
from mlplatform.monitoring.rollout import RolloutCursor
from mlplatform.resources import DataSource, MlflowTracking
from mlplatform.serving.release import RolloutState
from mlplatform.settings import load_settings
from mlplatform.status import collect_status
from mlplatform_tests.support import free_port, running_webhook, scored, tick

POLICY = {
    "MLPLATFORM_ROLLOUT_MIN_REQUESTS": "100",
    "MLPLATFORM_ROLLOUT_MIN_SECONDS": "60",
    "MLPLATFORM_ROLLOUT_MIN_LABELS": "100",
}


def _begin_rollout(
    monkeypatch: pytest.MonkeyPatch, source: Path, data_version: str
) -> RolloutState:
    """Champion v1 and challenger v2, trained on ``data_version``, in shadow for two minutes."""
    for name, value in POLICY.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    client.create_registered_model("mlplatform")
    for _ in range(2):
        version = client.create_model_version("mlplatform", source=str(source)).version
        client.set_model_version_tag("mlplatform", version, "data_version", data_version)
    client.set_registered_model_alias("mlplatform", CHAMPION_ALIAS, "1")
    state = RolloutState.begin("2", 0.2, now=time.time() - 120)
    MlflowTracking().set_rollout_state(state)
    return state


@pytest.fixture
def rollout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> RolloutState:
    """Champion v1 and challenger v2 in shadow for two minutes, in the platform home's registry."""
    sidecar = reference_sidecar(reference_profile_path(load_settings().profiles_dir, "d1"))
    sidecar.parent.mkdir(parents=True)
    sidecar.write_text(json.dumps({"task": "binary", "classes": [0, 1], "features": {}}))
    return _begin_rollout(monkeypatch, tmp_path / "model", "d1")


def _counts(state: RolloutState, requests: int, challenger_errors: int = 0) -> None:
    """Both versions' counts of the stage, as two replicas write them."""
    traffic = load_settings().traffic_dir
    for replica in ("a", "b"):
        for version, errors in (("1", 0), ("2", challenger_errors)):
            counts = VersionCounts()
            counts.add(requests // 2, errors // 2, 3.0)
            write_counts(
                traffic, "mlplatform", state.rollout_id, state.stage, version, replica, counts
            )


def _shadow_log(rows: int, since: float) -> None:
    """Champion answers, the shadow's scores of the same records, and labels for all."""
    store = FeedbackStore(load_settings().feedback_db)
    labels, champion = scored(rows, seed=7, signal=2.0)
    _, challenger = scored(rows, seed=7, signal=2.1)
    for log, scores, version in (
        (store.log_predictions, champion, "1"),
        (store.log_shadow_predictions, challenger, "2"),
    ):
        log(
            PredictionRecord(f"r{i}", 0, "mlplatform", version, int(s >= 0.5), float(s), since + 1)
            for i, s in enumerate(scores)
        )
    store.add_labels([{"request_id": f"r{i}", "label": int(y)} for i, y in enumerate(labels)])


def _canary_log(rows: int, since: float, challenger_right: float) -> None:
    """Each version's own answers in canary, labelled: the challenger right this often."""
    store = FeedbackStore(load_settings().feedback_db)
    rng = np.random.default_rng(8)
    truth = rng.integers(0, 2, rows)
    records = []
    for i in range(rows):
        version, accuracy = ("2", challenger_right) if i % 2 else ("1", 0.85)
        predicted = int(truth[i]) if rng.random() < accuracy else 1 - int(truth[i])
        records.append(
            PredictionRecord(f"c{i}", 0, "mlplatform", version, predicted, None, since + 1)
        )
    store.log_predictions(records)
    store.add_labels([{"request_id": f"c{i}", "label": int(y)} for i, y in enumerate(truth)])


def _report(instance: dg.DagsterInstance, **config: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [rollout_report],
        resources={"mlflow_tracking": MlflowTracking()},
        instance=instance,
        run_config={"ops": {"rollout_report": {"config": config}}} if config else None,
        raise_on_error=False,
    )


def _metadata(result: dg.ExecuteInProcessResult) -> dict:
    event = result.asset_materializations_for_node("rollout_report")[0]
    return {name: value.value for name, value in event.metadata.items()}


def _champion() -> str:
    return str(MlflowTracking().version_by_alias(CHAMPION_ALIAS).version)


def _tags(version: str) -> dict[str, str]:
    return MlflowTracking().client().get_model_version("mlplatform", version).tags


def test_a_healthy_challenger_goes_from_shadow_to_canary_to_champion(rollout, instance):
    waiting = _report(instance)
    assert waiting.success
    metadata = _metadata(waiting)
    assert (metadata["verdict"], metadata["stage"], metadata["stage_now"]) == (
        "wait",
        "shadow",
        "shadow",
    )
    assert "0 of 100 requests" in metadata["reasons"]
    assert MlflowTracking().rollout_state() == rollout  # a wait changes nothing

    _counts(rollout, 200)
    _shadow_log(200, rollout.stage_since)
    advanced = _report(instance)
    metadata = _metadata(advanced)
    assert (metadata["verdict"], metadata["stage_after"], metadata["stage_now"]) == (
        "advance",
        "canary",
        "canary",
    )
    evidence = metadata["evidence"]
    assert (evidence["challenger_requests"], evidence["shadow_rows"], evidence["labels"]) == (
        200,
        200,
        200,
    )
    assert evidence["labelled_metric"] == "roc_auc"
    canary = MlflowTracking().rollout_state()
    assert (canary.stage, canary.rollout_id) == ("canary", rollout.rollout_id)
    assert canary.stage_since > rollout.stage_since
    assert _champion() == "1"
    assert _tags("2")["rollout.verdict"] == "advance"
    assert json.loads(_tags("2")["rollout.evidence"])["shadow_rows"] == 200

    # The canary's stage starts from nothing: it waits for its own minimum of evidence.
    assert _metadata(_report(instance))["verdict"] == "wait"
    MlflowTracking().set_rollout_state(canary.model_copy(update={"stage_since": time.time() - 90}))
    canary = MlflowTracking().rollout_state()
    _counts(canary, 200)
    _canary_log(300, canary.stage_since, challenger_right=0.85)
    promoted = _report(instance)
    metadata = _metadata(promoted)
    assert (metadata["verdict"], metadata["champion_now"], metadata["stage_now"]) == (
        "advance",
        "2",
        "none",
    )
    assert _champion() == "2"
    assert MlflowTracking().rollout_state() is None
    tags = _tags("2")
    assert (tags[ROLLOUT_DECISION_TAG], tags["promotion.decision"]) == ("promoted", "promoted")
    assert tags["promotion.previous_champion"] == "1"
    assert "passed its rollout" in tags["promotion.reason"]


def test_labelled_evidence_is_compared_on_roc_auc_with_the_reference_profiles_classes(
    small_loans_csv, monkeypatch, tmp_path, instance
):
    # The positive class comes from the description the features job writes beside the
    # reference profile; labels and predictions are logged as the endpoint logs them (0/1).
    built = dg.materialize(
        [raw_data, features, reference_profile],
        resources={"data_source": DataSource(uri=str(small_loans_csv), target="defaulted")},
    )
    assert built.success
    rollout = _begin_rollout(
        monkeypatch, tmp_path / "model", built.output_for_node("features").data_version
    )
    _counts(rollout, 200)
    _shadow_log(200, rollout.stage_since)
    evidence = _metadata(_report(instance))["evidence"]
    assert (evidence["labels"], evidence["labelled_metric"]) == (200, "roc_auc")
    assert evidence["difference_low"] <= evidence["difference"] <= evidence["difference_high"]


def test_a_failing_challenger_is_rolled_back_and_alerted(rollout, instance, monkeypatch):
    _counts(rollout, 200, challenger_errors=40)
    with running_webhook() as hook:
        monkeypatch.setenv("MLPLATFORM_ALERT_WEBHOOK", hook.url)
        result = _report(instance)
    metadata = _metadata(result)
    assert (metadata["verdict"], metadata["stage_now"], metadata["champion_now"]) == (
        "roll_back",
        "none",
        "1",
    )
    assert "error rate 20.00%" in metadata["reasons"]
    assert MlflowTracking().rollout_state() is None
    tags = _tags("2")
    assert tags[ROLLOUT_DECISION_TAG] == "rolled_back"
    assert "error rate 20.00%" in tags["rollout.reason"]
    assert json.loads(tags["rollout.evidence"])["challenger_errors"] == 40
    (alert,) = hook.received
    assert "v2 rolled back, v1 stays champion" in alert["text"]
    # Nothing left to judge: a judging run says so and succeeds.
    assert _metadata(_report(instance))["verdict"] == "none"


def test_a_canary_worse_on_labels_is_rolled_back(rollout, instance):
    canary = rollout.model_copy(update={"stage": "canary"})
    MlflowTracking().set_rollout_state(canary)
    _counts(canary, 200)
    _canary_log(400, canary.stage_since, challenger_right=0.5)
    metadata = _metadata(_report(instance))
    assert metadata["verdict"] == "roll_back"
    assert "accuracy worse than the champion's" in metadata["reasons"]
    assert metadata["evidence"]["difference_high"] < 0
    assert _champion() == "1"


def test_manual_controls(rollout, instance):
    paused = _report(instance, action="pause")
    assert paused.success and MlflowTracking().rollout_state().paused
    # A paused rollout is judged and recorded, never moved.
    _counts(rollout, 200, challenger_errors=40)
    judged = _metadata(_report(instance))
    assert judged["verdict"] == "roll_back" and judged["stage_now"] == "shadow"
    assert "paused" in judged["summary"]
    assert _report(instance, action="resume").success
    assert not MlflowTracking().rollout_state().paused

    refused = _report(instance, action="promote")
    assert not refused.success
    failure = next(event for event in refused.all_events if event.is_step_failure)
    assert "needs a reason" in str(failure.step_failure_data.error)
    assert MlflowTracking().rollout_state() is not None

    promoted = _report(instance, action="promote", reason="business says go")
    metadata = _metadata(promoted)
    assert (metadata["verdict"], metadata["champion_now"]) == ("promote", "2")
    assert _tags("2")["promotion.reason"] == "promoted by hand: business says go"
    assert MlflowTracking().rollout_state() is None

    nothing = _report(instance, action="abort", reason="x")
    assert not nothing.success
    failure = next(event for event in nothing.all_events if event.is_step_failure)
    assert "no rollout under way" in str(failure.step_failure_data.error)


def test_abort_rolls_back_now(rollout, instance):
    metadata = _metadata(_report(instance, action="abort", reason="bad smell"))
    assert (metadata["verdict"], metadata["champion_now"], metadata["stage_now"]) == (
        "abort",
        "1",
        "none",
    )
    tags = _tags("2")
    assert (tags[ROLLOUT_DECISION_TAG], tags["rollout.reason"]) == (
        "rolled_back",
        "aborted by hand: bad smell",
    )


def test_sensor_requests_a_run_when_the_rollout_should_move(rollout, instance):
    quiet = tick(rollout_sensor, instance)
    assert not quiet.run_requests
    assert "wait: 0 of 100 requests" in quiet.skip_reason.skip_message
    (observation,) = quiet.asset_events
    assert observation.asset_key == dg.AssetKey("rollout_report")
    assert observation.metadata["verdict"].value == "wait"
    cursor = RolloutCursor.parse(quiet.cursor)
    assert (cursor.rollout_id, cursor.stage, cursor.run_key) == (rollout.rollout_id, "shadow", None)
    # The same verdict again is not recorded again.
    assert not tick(rollout_sensor, instance, cursor=quiet.cursor).asset_events

    _counts(rollout, 200, challenger_errors=40)
    fire = tick(rollout_sensor, instance, cursor=quiet.cursor)
    (request,) = fire.run_requests
    assert request.run_key == f"rollout-{rollout.rollout_id}-shadow-roll_back"
    assert request.tags["mlplatform/verdict"] == "roll_back"
    assert RolloutCursor.parse(fire.cursor).run_key == request.run_key
    again = tick(rollout_sensor, instance, cursor=fire.cursor)
    assert not again.run_requests and "already requested" in again.skip_reason.skip_message

    # A run that deploys the endpoint (a rollout run among them) holds requests back.
    job = defs.resolve_job_def("rollout_job")
    instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTED, tags=job.tags)
    busy = tick(rollout_sensor, instance)
    assert not busy.run_requests and "a deploy is under way" in busy.skip_reason.skip_message


def test_sensor_leaves_a_paused_rollout_and_idles_without_one(rollout, instance):
    MlflowTracking().set_rollout_state(rollout.model_copy(update={"paused": True}))
    _counts(rollout, 200, challenger_errors=40)
    paused = tick(rollout_sensor, instance)
    assert not paused.run_requests and "paused in shadow" in paused.skip_reason.skip_message
    MlflowTracking().set_rollout_state(None)
    idle = tick(rollout_sensor, instance, cursor=paused.cursor)
    assert "no rollout under way" in idle.skip_reason.skip_message
    assert idle.cursor == RolloutCursor().dump()


def test_rollout_job_judges_before_it_deploys():
    job = defs.resolve_job_def("rollout_job")
    assert job.tags["mlplatform/endpoint"] == "default"
    upstream = job.dependency_structure.input_to_upstream_outputs_for_node("model_endpoint")
    assert [output.node.name for outputs in upstream.values() for output in outputs] == [
        "rollout_report"
    ]


def test_status_shows_the_release_and_the_last_verdict(
    rollout, instance, capsys, monkeypatch, tmp_path
):
    _counts(rollout, 40)
    assert _report(instance).success
    uri = load_settings().tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    down = f"http://127.0.0.1:{free_port()}"
    status = collect_status(instance, client, "mlplatform", down, timeout_s=2)
    assert (status.rollout["challenger"], status.rollout["stage"]) == ("2", "shadow")
    assert status.last_rollout["verdict"] == "wait"
    assert status.last_rollout["evidence"]["challenger_requests"] == 40
    text = status.to_text()
    assert "Rollout:   v2 in shadow since" in text
    assert "Verdict:   wait" in text and "40 of 100 requests" in text
    assert "challenger_requests 40" in text
    assert status.to_dict()["rollout"]["rollout_id"] == rollout.rollout_id
    # A wait decides nothing; an action is a decision, with its version and what it did.
    assert status.decisions == []
    assert _report(instance, action="pause").success
    paused = collect_status(instance, client, "mlplatform", down, timeout_s=2)
    assert [(d["decision"], d["decided_version"]) for d in paused.decisions] == [
        ("rollout pause", "2")
    ]
    assert "rollout pause v2: " in paused.to_text()
    assert _report(instance, action="resume").success

    # The command line shows the same without a run, and refuses a promotion without a reason
    # before anything is deployed.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "cli-dagster"))
    assert main(["rollout"]) == 0
    shown = capsys.readouterr().out
    assert "Champion:  v1" in shown and "Rollout:   v2 in shadow" in shown
    assert main(["rollout", "promote"]) == 1
    assert "needs a reason" in capsys.readouterr().err
    assert MlflowTracking().rollout_state() == rollout and _champion() == "1"

    MlflowTracking().set_rollout_state(None)
    none = collect_status(instance, client, "mlplatform", down, timeout_s=2)
    assert none.rollout is None and "Rollout:   none under way" in none.to_text()


def test_a_version_registered_by_hand_is_judged_by_its_own_spec(rollout, instance, tmp_path):
    # A real model, logged and registered without training: no lineage tags, no task param.
    frame = generate_loans(300)
    spec = infer_feature_spec(frame, "defaulted")
    pipeline = make_model_pipeline(
        spec, build_preprocessor(spec, for_trees=False), LogisticRegression(max_iter=200)
    ).fit(frame, frame["defaulted"])
    uri = load_settings().tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("by-hand", artifact_location=str(tmp_path / "art"))
    with mlflow.start_run(experiment_id=experiment):
        logged = mlflow.pyfunc.log_model(
            name="model",
            python_model=TabularModel(pipeline, spec),
            registered_model_name="mlplatform",
        )
    version = str(logged.registered_model_version)
    state = RolloutState.begin(version, 0.2, now=time.time() - 120)
    MlflowTracking().set_rollout_state(state)
    counts = VersionCounts()
    counts.add(200, 40, 3.0)
    write_counts(
        load_settings().traffic_dir, "mlplatform", state.rollout_id, "shadow", version, "a", counts
    )

    metadata = _metadata(_report(instance))
    assert (metadata["verdict"], metadata["challenger_version"]) == ("roll_back", version)
    assert _tags(version)[ROLLOUT_DECISION_TAG] == "rolled_back"
