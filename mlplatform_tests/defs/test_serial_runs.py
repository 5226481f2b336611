"""Two `python -m mlplatform run` started at once: one after the other, each on its own outputs."""

import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import dagster as dg
import httpx
import ray
from mlflow import MlflowClient

from mlplatform.definitions import ASSETS, RETRAIN_TAGS
from mlplatform.defs.storage import RunScopedIOManager
from mlplatform.demo.data import generate_loans
from mlplatform.run_slots import run_turn
from mlplatform.settings import load_settings

# Everything up to the promotion: what needs no Ray.
TRAINING_ASSETS = [
    asset
    for asset in ASSETS
    if asset.key.to_user_string() not in {"model_endpoint", "drift_report"}
]
REPOSITORY = Path(__file__).resolve().parents[2]


def _loaded_paths(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """The file each step loaded its input from, as the run's input events record it."""
    return {
        f"{event.step_key}<-{event.dagster_event.event_specific_data.input_name}": str(
            event.dagster_event.event_specific_data.metadata["path"].value
        )
        for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.LOADED_INPUT)
    }


def _written_paths(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """The file each asset of the run was written to, as its materialization records it."""
    return {
        event.asset_materialization.asset_key.to_user_string(): str(
            event.asset_materialization.metadata["path"].value
        )
        for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        if "path" in event.asset_materialization.metadata
    }


def _materialized(instance: dg.DagsterInstance, run_id: str, name: str) -> dict:
    for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        if event.asset_materialization.asset_key == dg.AssetKey(name):
            return {k: v.value for k, v in event.asset_materialization.metadata.items()}
    raise AssertionError(f"run {run_id} did not materialize {name}")


def test_two_retrains_started_at_once_run_one_after_the_other(tmp_path, serve_port, monkeypatch):
    source = tmp_path / "loans.csv"
    generate_loans(n_rows=1200, seed=3).to_csv(source, index=False)
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    shutil.copy(REPOSITORY / "dagster.yaml", dagster_home / "dagster.yaml")  # as `make run`
    env = {
        "MLPLATFORM_HOME": str(tmp_path / "home"),
        "DAGSTER_HOME": str(dagster_home),
        "MLPLATFORM_SOURCE": str(source),
        "MLPLATFORM_TARGET": "defaulted",
        "MLPLATFORM_SERVE_PORT": str(serve_port),
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    command = [sys.executable, "-m", "mlplatform", "run"]
    processes = [
        subprocess.Popen(
            command,
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=900) for process in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, out[-2000:] + err[-3000:]

    with dg.DagsterInstance.get() as instance:
        records = instance.get_run_records(dg.RunsFilter(job_name="retrain_job"))
        first, second = sorted(records, key=lambda record: record.start_time)
        # One after the other: the second started when the first had ended.
        assert first.end_time <= second.start_time
        waiting = [out for out, _ in outputs if f"Dagster run {second.dagster_run.run_id}" in out]
        assert len(waiting) == 1
        assert f"Waiting for run {first.dagster_run.run_id} to finish" in waiting[0]
        storage = Path(instance.storage_directory()) / "runs"
        for record in (first, second):
            run_id = record.dagster_run.run_id
            written, loaded = _written_paths(instance, run_id), _loaded_paths(instance, run_id)
            assert {"raw_data", "features", "candidate_model", "champion_model"} <= set(written)
            assert {"features<-raw_data", "champion_model<-evaluation_report"} <= set(loaded)
            # Every output the run wrote, and every input its steps read, is in its directory.
            for path in [*written.values(), *loaded.values()]:
                assert Path(path).parent == storage / run_id, (run_id, path)
        # The second run judged its candidate against the champion the first one promoted.
        report = _materialized(instance, second.dagster_run.run_id, "evaluation_report")
        assert (report["challenger_version"], report["champion_version"]) == ("2", "1")

    uri = load_settings().tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = str(client.get_model_version_by_alias("mlplatform", "champion").version)
    served = httpx.get(f"http://127.0.0.1:{serve_port}/healthz", timeout=30).json()
    assert served["model_version"] == champion


def test_two_training_runs_at_once_take_turns_and_read_their_own_outputs(
    instance, training_resources
):
    """The same turn and storage as the command line's, on the real pipeline up to promotion."""
    job = dg.Definitions(
        assets=TRAINING_ASSETS,
        resources={**training_resources, "io_manager": RunScopedIOManager()},
        jobs=[dg.define_asset_job("training", tags=RETRAIN_TAGS)],
    ).resolve_job_def("training")
    said: dict[str, list[str]] = {}

    def command(run_id: str) -> None:
        said[run_id] = []
        with run_turn(instance, job.tags, run_id, say=said[run_id].append):
            assert job.execute_in_process(instance=instance, run_id=run_id).success

    run_ids = [str(uuid.uuid4()) for _ in range(2)]
    threads = [threading.Thread(target=command, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    records = instance.get_run_records(dg.RunsFilter(run_ids=run_ids))
    assert [record.dagster_run.status for record in records] == [dg.DagsterRunStatus.SUCCESS] * 2
    first, second = sorted(records, key=lambda record: record.start_time)
    assert first.end_time <= second.start_time
    assert said[second.dagster_run.run_id] == [
        f"Waiting for run {first.dagster_run.run_id} to finish (one at a time) ..."
    ]
    storage = Path(instance.storage_directory()) / "runs"
    for record in (first, second):
        run_id = record.dagster_run.run_id
        loaded = _loaded_paths(instance, run_id)
        assert len(loaded) >= 6
        for path in [*_written_paths(instance, run_id).values(), *loaded.values()]:
            assert Path(path).parent == storage / run_id, (run_id, path)
    report = _materialized(instance, second.dagster_run.run_id, "evaluation_report")
    assert (report["challenger_version"], report["champion_version"]) == ("2", "1")
