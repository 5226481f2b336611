"""The fast serving path: HAProxy in front of replicas answering HTTP themselves, single records
micro-batched into one frame and recorded beside the replica, cheap validation that accepts exactly
what the model can parse. Real Ray Serve over HTTP, real HAProxy, real SQLite; no mocks."""

import concurrent.futures
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from lightgbm import LGBMClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from mlplatform.demo.data import generate_loans
from mlplatform.model.fast_path import TreeRecordsPredictor
from mlplatform.model.pipeline import (
    DatetimeExpander,
    build_preprocessor,
    coerce_features,
    make_model_pipeline,
    parse_datetime,
)
from mlplatform.model.spec import infer_feature_spec
from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.serving import cluster
from mlplatform.serving.ingress import (
    SERVE_ENVIRONMENT,
    fast_ingress_environment,
    loopback_haproxy,
    stop_stray_haproxy,
)
from mlplatform.serving.recorder import TrafficRecorder
from mlplatform.serving.settings import ServingSettings
from mlplatform.serving.validation import InvalidRequest, check_records
from mlplatform_tests.support import deployed, free_port, train_champion

SPEC = infer_feature_spec(generate_loans(300), "defaulted")
PREFIX = "/fastpath"


def _records(n: int, seed: int) -> list[dict]:
    frame = generate_loans(n, seed=seed)[list(SPEC.features)].astype(object)
    return json.loads(frame.where(frame.notna(), None).to_json(orient="records"))


# --- validation: the fast path accepts exactly what the model's datetime parsing accepts --------

DATETIMES = [
    "2025-06-01",
    "2025-06-01T10:00",
    "2025-06-01 10:00:00",
    "2025-06-01T10:00:00.123456",
    "2025-06-01T10:00:00Z",
    "2025-06-01T10:00:00+02:00",
    "2025-06-01T10:00:00-0530",
    "June 1 2025",  # not ISO: pandas still parses it (slow path)
    "2025/06/01",
    "2025-02-30",
    "2025-13-01",
    "2025-06-01T25:00:00",
    "1600-01-01",  # outside pandas' timestamp range
    "2262-06-01",
    "yesterday",
    "",
]


@pytest.mark.parametrize("value", DATETIMES)
def test_datetime_check_agrees_with_the_models_parsing(value):
    parsed = not pd.isna(pd.to_datetime(value, errors="coerce", utc=True, format="mixed"))
    record = _records(1, seed=1)[0] | {"application_date": value}
    if parsed:
        check_records([record], SPEC, 10)
    else:
        with pytest.raises(InvalidRequest, match="ISO 8601"):
            check_records([record], SPEC, 10)


# The same rule against moments written out by hand (UTC): what validation accepts, the model's
# coercion and the fast scoring path read as that moment; what it refuses, they read as missing.
READABLE_DATETIMES = {
    "2025-06-01": datetime(2025, 6, 1, tzinfo=UTC),
    "2025-06-01T10:00": datetime(2025, 6, 1, 10, tzinfo=UTC),
    "2025-06-01 10:00:00": datetime(2025, 6, 1, 10, tzinfo=UTC),
    "2025-06-01T10:00:00.123456": datetime(2025, 6, 1, 10, 0, 0, 123456, tzinfo=UTC),
    "2025-06-01T10:00:00Z": datetime(2025, 6, 1, 10, tzinfo=UTC),
    "2025-06-01T10:00:00+02:00": datetime(2025, 6, 1, 8, tzinfo=UTC),
    "2025-06-01T10:00:00-0530": datetime(2025, 6, 1, 15, 30, tzinfo=UTC),
    "2025-06-01 10:00 PM": datetime(2025, 6, 1, 22, tzinfo=UTC),
    "June 1 2025": datetime(2025, 6, 1, tzinfo=UTC),
    "Sun, 01 Jun 2025 10:00:00 GMT": datetime(2025, 6, 1, 10, tzinfo=UTC),
    "2025/06/01": datetime(2025, 6, 1, tzinfo=UTC),
    "1/2/2025": datetime(2025, 1, 2, tzinfo=UTC),  # month first
    "20250601": datetime(2025, 6, 1, tzinfo=UTC),
    "2025-06": datetime(2025, 6, 1, tzinfo=UTC),
    "1677-12-31": datetime(1677, 12, 31, tzinfo=UTC),  # early in pandas' timestamp range
    "2262-04-11": datetime(2262, 4, 11, tzinfo=UTC),  # its last whole day
}
UNREADABLE_DATETIMES = [
    "2025-02-30",
    "2025-13-01",
    "2025-06-01T25:00:00",
    "2025-06-01T10:00:00+25:00",
    "1600-01-01",
    "2262-04-12",
    "yesterday",
    "NaT",
    "nan",
    "1e9",
    "",
]


@pytest.fixture(scope="module")
def tree_pipeline():
    """A fitted LightGBM pipeline on the demo loans, and its fast scoring path."""
    frame = generate_loans(300)
    pipeline = make_model_pipeline(
        SPEC, build_preprocessor(SPEC, for_trees=True), LGBMClassifier(n_estimators=5, verbose=-1)
    ).fit(frame, frame["defaulted"])
    return pipeline, TreeRecordsPredictor.from_pipeline(pipeline, SPEC)


@pytest.mark.parametrize("value", [*READABLE_DATETIMES, *UNREADABLE_DATETIMES])
def test_datetime_rule_on_values_written_out_by_hand(value, tree_pipeline):
    expected = READABLE_DATETIMES.get(value)
    record = _records(1, seed=1)[0] | {"application_date": value}
    assert parse_datetime(value) == expected
    if expected is None:
        with pytest.raises(InvalidRequest, match="ISO 8601"):
            check_records([record], SPEC, 10)
    else:
        assert check_records([record], SPEC, 10) == [record]
    coerced = coerce_features(pd.DataFrame([record]), SPEC)["application_date"].iloc[0]
    assert pd.isna(coerced) if expected is None else coerced == expected
    pipeline, fast_path = tree_pipeline
    names = list(pipeline.named_steps["preprocess"].get_feature_names_out())
    row = fast_path.matrix([record])[0]
    parts = [row[names.index(f"datetime__application_date_{p}")] for p in DatetimeExpander.parts]
    if expected is None:
        assert np.isnan(parts).all()
    else:
        assert parts == [expected.month, expected.weekday(), expected.hour]


def test_a_pipeline_with_a_step_of_its_own_takes_the_slow_path(tree_pipeline):
    pipeline, fast_path = tree_pipeline
    assert fast_path is not None
    coerce, *rest = pipeline.steps
    # A step the fast path knows nothing of: it would be skipped, so the pipeline scores instead.
    cast = FunctionTransformer(pd.DataFrame.astype, kw_args={"dtype": {"income": "float32"}})
    extended = Pipeline([coerce, ("cast", cast), *rest])
    assert TreeRecordsPredictor.from_pipeline(extended, SPEC) is None
    renamed = Pipeline([("first", coerce[1]), *rest])
    assert TreeRecordsPredictor.from_pipeline(renamed, SPEC) is None


def test_fast_and_slow_validation_give_the_same_frame():
    records = _records(200, seed=2)
    records[3]["income"] = None
    records[5]["application_date"] = "June 1 2025"  # forces the field-by-field path
    others = [r for i, r in enumerate(records) if i != 5]
    assert check_records(records, SPEC, 1000) is records  # accepted, left as posted
    assert check_records(others, SPEC, 1000) is others
    # The model's input frame, as its pipeline reads the records.
    slow = coerce_features(pd.DataFrame(records), SPEC)
    fast = coerce_features(pd.DataFrame(others), SPEC)
    pd.testing.assert_frame_equal(fast, slow.drop(index=5).reset_index(drop=True))


# --- the recorder: a micro-batch of one-record requests, each joined by its own id ------------


def test_a_micro_batch_is_recorded_as_one_record_requests(tmp_path):
    frame = generate_loans(6, seed=3)[list(SPEC.features)]
    probability = np.linspace(0.1, 0.9, 6)
    result = pd.DataFrame(
        {"prediction": (probability > 0.5).astype(int), "probability": probability}
    )
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    ids = [f"single-{i}" for i in range(6)]
    with TrafficRecorder(tmp_path, "loans", "1", SPEC, "r", feedback=store) as recorder:
        assert recorder.record(ids, frame, result)
        with pytest.raises(ValueError, match="request ids"):
            recorder.record(ids[:2], frame, result)
    stats = recorder.stats()
    assert (stats.received_requests, stats.received_rows, stats.logged_rows) == (6, 6, 6)
    labels = [{"request_id": i, "index": 0, "label": 1} for i in ids]
    assert store.add_labels(labels).matched == 6
    assert store.add_labels([{"request_id": "single-0", "index": 1, "label": 1}]).matched == 0


# --- the environment the platform gives its head ------------------------------------------------


def test_single_node_environment_keeps_everything_on_loopback_and_the_callers_choice(
    monkeypatch, tmp_path
):
    environment = fast_ingress_environment(single_node=True)
    assert SERVE_ENVIRONMENT.items() <= environment.items()
    assert os.access(environment["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    ports = {environment[f"RAY_SERVE_FALLBACK_PROXY_{p}_PORT"] for p in ("HTTP", "GRPC")}
    assert len(ports) == 2 and "8500" not in ports  # its own, not Ray's fixed defaults
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in fast_ingress_environment(single_node=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert cluster.loopback_environment(tmp_path)["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_SOCKET_PATH", "/srv/haproxy/admin.sock")
    assert cluster.loopback_environment(tmp_path)["RAY_SERVE_HAPROXY_SOCKET_PATH"] == (
        "/srv/haproxy/admin.sock"
    )


@pytest.mark.parametrize("temporary", ["default", "deep"])
def test_each_platform_home_has_a_private_haproxy_directory_with_short_socket_paths(
    tmp_path, monkeypatch, temporary
):
    if temporary == "deep":  # a CI job's TMPDIR: sockets under it would not fit
        deep = tmp_path / ("t" * 60)
        deep.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(deep))
    deep_home = tmp_path / ("very-long-platform-home-name" * 4) / "ray"
    directory = cluster.LocalHead(6379, deep_home).haproxy_dir
    assert directory == cluster.LocalHead(6380, deep_home).haproxy_dir  # found again
    assert directory != cluster.LocalHead(6379, tmp_path / "other").haproxy_dir
    assert directory.stat().st_uid == os.getuid()
    assert directory.stat().st_mode & 0o777 == 0o700
    node_directory = directory / ("f" * 56)  # Ray puts a node's files in a directory of its id
    environment = cluster.loopback_environment(directory)
    for name in ("SOCKET_PATH", "METRICS_SOCKET_PATH"):
        socket_path = Path(environment[f"RAY_SERVE_HAPROXY_{name}"])
        assert socket_path.parent == directory
        assert len(str(node_directory / socket_path.name)) <= 97  # HAProxy's limit
    assert len(str(node_directory / "l9101.sock")) <= 97  # the side listeners' sockets
    for home in (deep_home, tmp_path / "other"):
        stop_stray_haproxy(cluster.LocalHead(6379, home).haproxy_dir)
    assert not directory.exists()


HAPROXY_CONFIG = """global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s
frontend prometheus
    bind :{metrics}
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
frontend http_frontend
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    server replica 127.0.0.1:9
listen stats
  bind *:{stats}
  stats enable
"""


def test_haproxy_listens_on_loopback_only_and_dies_with_its_parent(tmp_path):
    wrapper = loopback_haproxy(tmp_path / "bin")
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(metrics=9101, stats=8404, port=port))
    check = subprocess.run([wrapper, "-c", "-f", config], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    binds = re.findall(r"^\s*bind (\S+)", config.read_text(), re.MULTILINE)
    assert binds == [
        f"unix@{tmp_path}/l9101.sock",
        f"127.0.0.1:{port}",
        f"unix@{tmp_path}/l8404.sock",
    ]

    # A parent (Ray's HAProxy manager) starts it, then dies without stopping it.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            f"child = subprocess.Popen([{str(wrapper)!r}, '-db', '-f', {str(config)!r}]); "
            "print(child.pid, flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    haproxy = int(parent.stdout.readline())
    deadline = time.monotonic() + 20
    while not cluster.port_is_open("127.0.0.1", port):
        assert time.monotonic() < deadline, "HAProxy did not start"
        time.sleep(0.1)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()

    # The process itself, not the port: once it is gone, another program may take the port.
    def running() -> bool:
        try:
            state = Path(f"/proc/{haproxy}/stat").read_text().split(") ", 1)[-1][:1]
        except FileNotFoundError:
            return False
        return state != "Z"

    deadline = time.monotonic() + 20
    while running():
        assert time.monotonic() < deadline, "HAProxy outlived its parent"
        time.sleep(0.1)


def test_stray_haproxy_of_a_directory_is_killed_and_others_are_left_alone(tmp_path):
    wrapper = loopback_haproxy(tmp_path / "bin")
    started = {}
    directories = {
        name: cluster.LocalHead(6379, tmp_path / name).haproxy_dir for name in ("ours", "theirs")
    }
    for name, home_directory in directories.items():
        directory = home_directory / "node"  # short enough for HAProxy's Unix sockets
        directory.mkdir()
        config = directory / "haproxy.cfg"
        port = free_port()
        config.write_text(HAPROXY_CONFIG.format(metrics=9101, stats=8404, port=port))
        started[name] = subprocess.Popen([wrapper, "-db", "-f", config])
        deadline = time.monotonic() + 20
        while not cluster.port_is_open("127.0.0.1", port):
            assert time.monotonic() < deadline, "HAProxy did not start"
            time.sleep(0.1)
    try:
        killed = stop_stray_haproxy(directories["ours"])
        assert killed == [started["ours"].pid]
        assert started["ours"].wait(timeout=10) == -signal.SIGKILL
        assert started["theirs"].poll() is None
        assert not directories["ours"].exists()
    finally:
        for process in started.values():
            process.kill()
            process.wait()
        stop_stray_haproxy(directories["theirs"])


def test_haproxy_keeps_its_configuration_and_admin_socket_in_the_platform_directory(
    ray_head, serve_port
):
    import ray

    node_directory = ray_head.haproxy_dir / ray.get_runtime_context().get_node_id()
    admin_socket = node_directory / "admin.sock"
    deadline = time.monotonic() + 30
    while not admin_socket.exists():
        assert time.monotonic() < deadline, f"no admin socket in {node_directory}"
        time.sleep(0.2)
    assert stat.S_ISSOCK(admin_socket.stat().st_mode)
    assert ray_head.haproxy_dir.stat().st_uid == os.getuid()
    assert ray_head.haproxy_dir.stat().st_mode & 0o777 == 0o700  # nobody else may enter
    config = (node_directory / "haproxy.cfg").read_text()
    assert re.search(rf"^\s*stats socket {re.escape(str(admin_socket))}\b", config, re.MULTILINE)
    assert not (Path("/tmp/haproxy-serve") / node_directory.name).exists()


# --- the deployed endpoint ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_endpoint(serve_port: int, tmp_path_factory: pytest.TempPathFactory):
    """A champion served with traffic profiling and the prediction log, under /fastpath."""
    settings, _ = train_champion(tmp_path_factory.mktemp("fast-path-home"), seed=8)
    serving = ServingSettings(
        model_uri="models:/mlplatform@champion",
        tracking_uri=settings.tracking_uri,
        traffic_dir=str(settings.traffic_dir),
        feedback_db=str(settings.feedback_db),
    )
    with deployed(serving, serve_port, PREFIX.strip("/")) as url:
        yield {"url": url, "port": serve_port, "tracking_uri": settings.tracking_uri}


def _listening_process(port: int) -> int:
    """The pid of the process holding the listening socket of ``127.0.0.1:port``."""
    inode = next(
        line.split()[9]
        for table in ("/proc/net/tcp", "/proc/net/tcp6")
        for line in Path(table).read_text().splitlines()[1:]
        if int(line.split()[1].split(":")[1], 16) == port and line.split()[3] == "0A"
    )
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no process holds port {port}")


def _settled_haproxy_config(port: int, timeout_s: float = 30.0) -> str:
    """The configuration of the HAProxy answering on ``port``, once Ray has finished writing it.

    Ray rewrites the file and reloads HAProxy whenever an application of the session's Serve
    instance is deployed or deleted; a read in the middle of that sees a half-written file, and
    a read just after a deploy may not list the new replicas yet (meanwhile Serve's proxy, the
    backup server, answers for them). What stays wrong for ``timeout_s`` is returned as it is,
    for the assertions to report.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        haproxy = _listening_process(port)
        command = Path(f"/proc/{haproxy}/cmdline").read_bytes().split(b"\0")
        assert command[0].endswith(b"haproxy"), command
        config = Path(command[command.index(b"-f") + 1].decode()).read_text()
        settled = not re.findall(
            r"^\s*bind (?!127\.0\.0\.1:|unix@)", config, re.MULTILINE
        ) and re.search(r"server SERVE_REPLICA_fastpath", config)
        if settled or time.monotonic() > deadline:
            return config
        time.sleep(0.5)


def test_haproxy_answers_and_replicas_serve_http_themselves(fast_endpoint):
    config = _settled_haproxy_config(fast_endpoint["port"])
    assert not re.findall(r"^\s*bind (?!127\.0\.0\.1:|unix@)", config, re.MULTILINE)
    replicas = re.findall(r"server SERVE_REPLICA_fastpath\S* 127\.0\.0\.1:(\d+)", config)
    assert replicas, config
    record = _records(1, seed=4)
    direct = httpx.post(f"http://127.0.0.1:{replicas[0]}{PREFIX}/predict", json={"records": record})
    assert direct.status_code == 200 and direct.json()["model_version"] == "1"


def test_single_records_are_batched_answered_and_logged_one_by_one(fast_endpoint):
    url = fast_endpoint["url"]
    records = _records(48, seed=9)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(
            pool.map(lambda r: httpx.post(f"{url}/predict", json={"records": [r]}), records)
        )
    assert [a.status_code for a in answers] == [200] * len(records)
    bodies = [a.json() for a in answers]
    assert all(a.headers["content-type"] == "application/json" for a in answers)
    mlflow.set_tracking_uri(fast_endpoint["tracking_uri"])
    expected = mlflow.pyfunc.load_model("models:/mlplatform/1").predict(pd.DataFrame(records))
    assert [b["predictions"][0] for b in bodies] == expected["prediction"].tolist()
    assert [b["probabilities"][0] for b in bodies] == pytest.approx(
        expected["probability"].tolist(), abs=1e-12
    )
    ids = [b["request_id"] for b in bodies]
    assert len(set(ids)) == len(ids)

    labels = {"labels": [{"request_id": i, "index": 0, "label": 1} for i in ids]}
    deadline = time.monotonic() + 30
    while True:  # predictions reach the log within about a second
        matched = httpx.post(f"{url}/feedback", json=labels, timeout=30).json()["matched"]
        if matched == len(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert matched == len(ids)
    traffic = httpx.get(f"{url}/healthz").json()["traffic"]
    assert traffic["received_requests"] >= len(ids)
    assert (traffic["dropped_requests"], traffic["errors"]) == (0, 0)


def test_a_large_request_is_one_answer(fast_endpoint):
    records = _records(300, seed=10)
    answer = httpx.post(f"{fast_endpoint['url']}/predict", json={"records": records}, timeout=30)
    assert answer.status_code == 200
    body = answer.json()
    assert len(body["predictions"]) == len(body["probabilities"]) == 300
