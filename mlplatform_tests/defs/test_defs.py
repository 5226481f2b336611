"""The real Definitions load, and the command lines work against a real instance."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import httpx
import pytest
import yaml

from mlplatform.definitions import defs
from mlplatform.run_slots import SERIAL_TAG_KEYS, serial_tags
from mlplatform.serving.cluster import port_is_open
from mlplatform_tests.support import free_port

EXPECTED_GROUPS = {
    "raw_data": "ingest",
    "features": "features",
    "reference_profile": "features",
    "candidate_model": "training",
    "evaluation_report": "evaluation",
    "champion_model": "registry",
    "model_endpoint": "serving",
    "drift_report": "monitoring",
    "rollout_report": "monitoring",
}
RETRAIN_ASSETS = set(EXPECTED_GROUPS) - {"drift_report", "rollout_report"}
REPO = Path(__file__).resolve().parents[2]


def test_definitions_load_with_groups_kinds_and_descriptions():
    graph = defs.resolve_asset_graph()
    specs = {spec.key.to_user_string(): spec for spec in defs.resolve_all_asset_specs()}
    assert set(specs) == set(EXPECTED_GROUPS)
    for name, group in EXPECTED_GROUPS.items():
        assert specs[name].group_name == group
        assert specs[name].description
        assert specs[name].kinds
        assert specs[name].owners
    # The endpoint serves the release the registry decisions make (a new challenger, its stages).
    assert graph.get(dg.AssetKey("model_endpoint")).parent_keys == {
        dg.AssetKey("champion_model"),
        dg.AssetKey("rollout_report"),
    }
    blocking = {key.name for key in graph.asset_check_keys if graph.get(key).blocking}
    assert {"schema", "target_is_usable", "promotion_gate"} <= blocking
    assert "no_drift" not in blocking  # drift warns; the sensors act on it
    for name in ("raw_data", "candidate_model"):
        assert specs[name].freshness_policy is not None
    sensors = {sensor.name for sensor in defs.sensors}
    assert sensors == {
        "drift_sensor",
        "freshness_sensor",
        "run_failure_alert",
        "endpoint_sensor",
        "rollout_sensor",
    }
    assert defs.resolve_sensor_def("rollout_sensor").minimum_interval_seconds == 30


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


@pytest.mark.parametrize("config", ["dagster.yaml", "deploy/dagster.yaml"])
def test_the_command_line_takes_turns_on_the_tags_the_queue_limits(config):
    queue = yaml.safe_load((REPO / config).read_text())["run_coordinator"]["config"]
    limited = {limit["key"] for limit in queue["tag_concurrency_limits"]}
    assert limited == set(SERIAL_TAG_KEYS)
    for job in ("retrain_job", "rollback_job", "deploy_job", "rollout_job"):
        assert serial_tags(defs.resolve_job_def(job).tags)  # each takes its turn


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
    program: str | list[str],
    *args: str,
    platform_home: Path,
    dagster_home: Path,
    base: dict[str, str] | None = None,
    **env: str,
) -> subprocess.CompletedProcess:
    """Run a program of the venv as a user would, on the test's platform and Dagster homes.

    Args:
        program: a program beside this interpreter, or a whole command.
        args: its arguments.
        platform_home: ``MLPLATFORM_HOME``.
        dagster_home: ``DAGSTER_HOME`` (created).
        base: the environment to start from; default this process's.
        env: more variables.

    """
    dagster_home.mkdir(parents=True, exist_ok=True)
    environment = (os.environ if base is None else base) | {
        "MLPLATFORM_HOME": str(platform_home),
        "DAGSTER_HOME": str(dagster_home),
        **env,
    }
    beside = [str(Path(sys.executable).with_name(program))] if isinstance(program, str) else None
    command = beside or program
    result = subprocess.run(
        [*command, *args],
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


@pytest.mark.ray  # starts a Ray head of its own, as a user's first run does
def test_main_command_works_from_an_empty_home_and_stop_stops_it(platform_home, tmp_path):
    """`make run` on a machine that never saw Ray or the platform: a HOME with nothing in it.

    The platform starts its own Ray head (on free ports, so the session's head is untouched),
    creates the head's token in the platform home, serves, prints a curl that works; `stop`
    takes the head and the endpoint down.
    """
    home = tmp_path / "user-home"
    home.mkdir()
    ray_port, serve_port, metrics_port = free_port(), free_port(), free_port()
    environment = {
        "HOME": str(home),
        "MLPLATFORM_RAY_PORT": str(ray_port),
        "MLPLATFORM_SERVE_PORT": str(serve_port),
        "MLPLATFORM_METRICS_PORT": str(metrics_port),
    }
    # Nothing of this test session's Ray: no address, no token, no serving settings.
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("RAY_", "XDG_")) and name != "HOME"
    }
    command = [sys.executable, "-m", "mlplatform"]
    run = _run_command(
        command,
        "run",
        base=inherited,
        platform_home=platform_home,
        dagster_home=tmp_path / "dagster",
        **environment,
    )
    try:
        assert f"is live at http://127.0.0.1:{serve_port}" in run.stdout
        # One line per asset, then the endpoint: the DEBUG event stream went to the log file.
        assert re.search(r"^  model_endpoint +[0-9.]+s  serving v1 at http", run.stdout, re.M)
        assert "DEBUG" not in run.stdout + run.stderr
        log = re.search(r"full log: (\S+\.log)", run.stdout).group(1)
        assert "STEP_SUCCESS" in Path(log).read_text()
        curl = re.search(r"^\s*(curl .*)$", run.stdout, re.MULTILINE).group(1)
        answer = subprocess.run(curl, shell=True, capture_output=True, text=True, check=True)
        assert json.loads(answer.stdout)["model_version"] == "1"
        token = platform_home / "ray" / "auth_token"
        assert token.stat().st_mode & 0o777 == 0o600
        assert not (home / ".ray").exists()
    finally:
        stop = _run_command(
            command,
            "stop",
            base=inherited,
            platform_home=platform_home,
            dagster_home=tmp_path / "dagster",
            **environment,
        )
    assert "Stopped the local Ray head" in stop.stdout
    assert not port_is_open("127.0.0.1", ray_port)
    assert not port_is_open("127.0.0.1", serve_port)
    assert not port_is_open("127.0.0.1", metrics_port)


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
