"""The real Definitions load, and the command lines work against a real instance."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import httpx
import ray
from conftest import free_port

from mlplatform.definitions import defs

EXPECTED_GROUPS = {
    "raw_data": "ingest",
    "features": "features",
    "reference_profile": "features",
    "candidate_model": "training",
    "evaluation_report": "evaluation",
    "champion_model": "registry",
    "model_endpoint": "serving",
    "drift_report": "monitoring",
}
RETRAIN_ASSETS = set(EXPECTED_GROUPS) - {"drift_report"}
REPO = Path(__file__).resolve().parents[1]


def test_definitions_load_with_groups_kinds_and_descriptions():
    graph = defs.resolve_asset_graph()
    specs = {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}
    assert set(specs) == set(EXPECTED_GROUPS)
    for name, group in EXPECTED_GROUPS.items():
        assert specs[name].group_name == group
        assert specs[name].description
        assert specs[name].kinds
        assert specs[name].owners
    assert graph.get(dg.AssetKey("model_endpoint")).parent_keys == {dg.AssetKey("champion_model")}
    blocking = {key.name for key in graph.asset_check_keys if graph.get(key).blocking}
    assert {"schema", "target_is_usable", "promotion_gate"} <= blocking
    assert "no_drift" not in blocking  # drift warns; the sensors act on it
    for name in ("raw_data", "candidate_model"):
        assert specs[name].freshness_policy is not None
    sensors = {sensor.name for sensor in defs.sensors}
    assert sensors == {"drift_sensor", "freshness_sensor", "run_failure_alert"}


def test_instance_queue_admits_one_retrain_at_a_time(tmp_path):
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(home)) as instance:
        limits = instance.run_coordinator.get_run_queue_config().tag_concurrency_limits
    retrain = next(limit for limit in limits if limit["key"] == "mlplatform/workload")
    assert retrain == {"key": "mlplatform/workload", "value": "retrain", "limit": 1}
    tags = defs.resolve_job_def("retrain_job").tags
    assert tags["mlplatform/workload"] == "retrain"


def test_retrain_job_covers_the_whole_graph_but_monitoring():
    job = defs.resolve_job_def("retrain_job")
    assert {node.name for node in job.nodes} == RETRAIN_ASSETS


def test_workspace_and_instance_files_load(tmp_path):
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"


def _run_command(
    program: str, *args: str, platform_home: Path, dagster_home: Path, **env: str
) -> subprocess.CompletedProcess:
    """Run one of the venv's programs as a user would, on the test's platform and Dagster homes."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    environment = os.environ | {
        "MLPLATFORM_HOME": str(platform_home),
        "DAGSTER_HOME": str(dagster_home),
        **env,
    }
    result = subprocess.run(
        [str(Path(sys.executable).with_name(program)), *args],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cli_materializes_a_selection(platform_home, tmp_path):
    dagster_home = tmp_path / "dagster"
    _run_command(
        "dagster",
        *("asset", "materialize", "-m", "mlplatform.definitions", "--select", "raw_data,features"),
        platform_home=platform_home,
        dagster_home=dagster_home,
    )
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("features"))
        assert event is not None
        assert event.asset_materialization.metadata["train_rows"].value == 3500


def test_main_command_serves_and_prints_a_working_curl(platform_home, tmp_path, serve_port):
    result = _run_command(
        Path(sys.executable).name,
        *("-m", "mlplatform", "run"),
        platform_home=platform_home,
        dagster_home=tmp_path / "dagster",
        RAY_ADDRESS=ray.get_runtime_context().gcs_address,
        MLPLATFORM_SERVE_PORT=str(serve_port),
    )
    assert f"is live at http://127.0.0.1:{serve_port}" in result.stdout
    curl = re.search(r"^\s*(curl .*)$", result.stdout, re.MULTILINE).group(1)
    answer = subprocess.run(curl, shell=True, capture_output=True, text=True, check=True)
    assert '"model_version":"1"' in answer.stdout
    assert httpx.get(f"http://127.0.0.1:{serve_port}/healthz").json()["model_version"] == "1"


def test_workspace_file_loads_the_code_location(platform_home, tmp_path):
    result = _run_command(
        "dagster",
        *("definitions", "validate", "-w", str(REPO / "workspace.yaml")),
        platform_home=platform_home,
        dagster_home=tmp_path / "dagster",
    )
    assert "Validation successful for code location mlplatform" in result.stdout + result.stderr


def test_web_ui_serves_the_asset_graph(platform_home, tmp_path):
    """The UI that `make ui` opens: the webserver on workspace.yaml answers with the graph."""
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("dagster-webserver")),
            *("-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)),
        ],
        env=os.environ | {"MLPLATFORM_HOME": str(platform_home), "DAGSTER_HOME": str(dagster_home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        query = "{ assetNodes { assetKey { path } groupName kinds description } }"
        nodes = httpx.post(f"{url}/graphql", json={"query": query}, timeout=30).json()["data"][
            "assetNodes"
        ]
    finally:
        server.terminate()
        server.wait(timeout=30)
    by_name = {node["assetKey"]["path"][-1]: node for node in nodes}
    assert {name: node["groupName"] for name, node in by_name.items()} == EXPECTED_GROUPS
    assert "lightgbm" in by_name["candidate_model"]["kinds"]
    assert "ray" in by_name["model_endpoint"]["kinds"]
    assert all(node["description"] for node in nodes)
