"""Helpers the tests share: free ports, an isolated platform home, sensor ticks, a champion,
scored labels, recorded traffic, decoded pictures and a disk to fill up."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb

import mlplatform.serving  # noqa: F401  (sets Ray's loopback mode before Ray is imported)
from mlplatform.defs.evaluation import evaluation_report
from mlplatform.defs.features import features
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.registry import champion_model
from mlplatform.defs.training import candidate_model
from mlplatform.demo.data import generate_loans
from mlplatform.model.spec import FeatureSpec, infer_feature_spec
from mlplatform.monitoring.profiles import list_traffic_windows
from mlplatform.resources import DataSource, MlflowTracking
from mlplatform.serving import cluster
from mlplatform.serving.keys import KeyDigests
from mlplatform.serving.release import Release
from mlplatform.serving.settings import ServingSettings
from mlplatform.settings import PlatformSettings, load_settings
from mlplatform.tasks.base import ModelOutput

PLATFORM_VARIABLES = (
    "MLPLATFORM_SOURCE",
    "MLPLATFORM_TARGET",
    "MLPLATFORM_TIME_COLUMN",
    "MLPLATFORM_MODEL_NAME",
    "MLPLATFORM_SERVE_HOST",
    "MLPLATFORM_SERVE_PORT",
    "MLPLATFORM_ENDPOINT_URL",
    "MLPLATFORM_RAY_PORT",
    "MLPLATFORM_METRICS_PORT",
    "MLPLATFORM_API_KEYS",
    "MLPLATFORM_API_KEY",
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
)


# Short traffic windows so tests do not wait a minute for a profile to be written.
FAST_WINDOWS = {"ops": {"model_endpoint": {"config": {"traffic_window_s": 2}}}}


def wait_for_profiled_rows(version: str, rows: int, timeout_s: float = 60.0) -> int:
    """Wait until the endpoint's traffic windows for ``version`` hold ``rows`` rows."""
    settings = load_settings()
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        seen = sum(
            w.rows for w in list_traffic_windows(settings.traffic_dir, "mlplatform", version)
        )
        if seen >= rows:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"only {seen} of {rows} rows profiled for v{version}")


def tick(sensor: Any, instance: dg.DagsterInstance, cursor: str | None = None) -> Any:
    """One evaluation of a sensor of the real Definitions on ``instance``, with their resources."""
    from mlplatform.definitions import defs

    with dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, resources=defs.resources
    ) as context:
        return sensor(context)


@dataclasses.dataclass(frozen=True)
class Webhook:
    """A webhook receiver on 127.0.0.1 and the JSON bodies POSTed to it, in order."""

    url: str
    received: list[dict[str, Any]]


@contextlib.contextmanager
def running_webhook(get_answer: tuple[int, bytes] = (404, b"")) -> Iterator[Webhook]:
    """A real HTTP server that records what it is sent, for one test only (shut down after).

    Args:
        get_answer: the status and body it answers every GET with (an endpoint that answers
            badly, say).

    """
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def do_GET(self) -> None:
            status, body = get_answer
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", free_port()), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Webhook(f"http://127.0.0.1:{server.server_port}/hook", received)
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def isolate_platform(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point the platform at ``home`` and forget every other platform and MLflow setting.

    MLflow keeps its tracking URI in a module global and mirrors it into MLFLOW_TRACKING_URI, so
    both are reset: otherwise one test's store would leak into the next.
    """
    monkeypatch.setenv("MLPLATFORM_HOME", str(home))
    for name in PLATFORM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(None)


def train_champion(home: Path, seed: int) -> tuple[PlatformSettings, str]:
    """Train and promote a champion on 1,000 demo loans with the real assets, in ``home``.

    Returns:
        The settings of that platform home (tracking URI, traffic and feedback paths) and the
        Dagster run id.

    """
    data = home / "loans.csv"
    generate_loans(1000, seed=seed).to_csv(data, index=False)
    with pytest.MonkeyPatch.context() as patch:
        isolate_platform(patch, home)
        result = dg.materialize(
            [raw_data, features, candidate_model, evaluation_report, champion_model],
            resources={
                "data_source": DataSource(uri=str(data), target="defaulted"),
                "mlflow_tracking": MlflowTracking(),
            },
        )
        assert result.success
        return load_settings(), result.run_id


def recorded_serving(platform: PlatformSettings, **knobs: Any) -> ServingSettings:
    """The champion of ``platform`` served with traffic profiling and the prediction log."""
    return ServingSettings(
        model_uri="models:/mlplatform@champion",
        tracking_uri=platform.tracking_uri,
        traffic_dir=str(platform.traffic_dir),
        feedback_db=str(platform.feedback_db),
        **knobs,
    )


@contextlib.contextmanager
def deployed(
    settings: ServingSettings,
    serve_port: int,
    app_name: str,
    api_keys: KeyDigests | None = None,
    release: Release | None = None,
) -> Iterator[str]:
    """``settings`` served on the session's Ray Serve under ``/<app_name>``, deleted on exit.

    With ``api_keys``, the app accepts those keys only (their digests and scopes).

    Yields:
        The app's URL, once it serves the release (model version 1 when none is given).

    """
    cluster.deploy(
        settings,
        ray_address=None,
        host="127.0.0.1",
        port=serve_port,
        app_name=app_name,
        local_head=None,
        route_prefix=f"/{app_name}",
        api_keys=api_keys,
        release=release,
    )
    url = f"http://127.0.0.1:{serve_port}/{app_name}"
    if release is None:
        cluster.wait_until_serving(url, "1")
    else:
        cluster.wait_until_serving(url, release.champion, rollout=release.rollout_label)
    try:
        yield url
    finally:
        from ray import serve

        serve.delete(app_name)


def register_copy(version: str, directory: Path, corrupt: bool = False) -> str:
    """Register a copy of a version's model files as a new version of the platform's model.

    Args:
        version: the version copied.
        directory: where the copy's files are written.
        corrupt: replace the pickled model with bytes that are no pickle (a version that
            cannot be loaded: a broken upload, a truncated file).

    Returns:
        The new version.

    """
    uri = load_settings().tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    files = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/mlplatform/{version}", dst_path=str(directory)
        )
    )
    if corrupt:
        (files / "python_model.pkl").write_bytes(b"\x00 this is not a pickle")
    experiment = mlflow.get_experiment_by_name("mlplatform")
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.log_artifacts(str(files), "model")
    return str(mlflow.register_model(f"runs:/{run.info.run_id}/model", "mlplatform").version)


def scored(
    n: int, seed: int = 0, signal: float = 1.5, prevalence: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and informative, noisy probabilities (logistic in a Gaussian score)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < prevalence).astype(int)
    score = signal * labels + rng.normal(0, 1, n) - 1.5
    return labels, 1 / (1 + np.exp(-score))


T0 = 1_767_225_600.0
"""2026-01-01T00:00:00Z, a multiple of 60 s: windows of a minute start here."""


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def inputs(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """The raw input columns, as the endpoint's validation hands them on."""
    return frame[list(spec.features)]


def binary_result(n: int, seed: int = 0) -> ModelOutput:
    """What a binary model answers for ``n`` records (the recorder only profiles and logs it)."""
    probability = np.random.default_rng(seed).random(n)
    return ModelOutput({"prediction": (probability >= 0.5).astype(int), "probability": probability})


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


class RunningThreads:
    """Threads started on entering a ``with`` block and stopped on leaving it.

    ``stop`` is set on leaving; each target loops until it is, and is then joined.
    """

    def __init__(self, targets: list[Callable[[], None]]):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=target) for target in targets]

    def __enter__(self) -> Any:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def report_figure(record_property: Callable[[str, Any], None], name: str, **figures: Any) -> str:
    """Report a fault test's measured figures: a recorded property and a ``FIGURE`` line.

    The property (``record_property``, in the JUnit XML report) keeps the numbers with the test;
    the printed line (``pytest -s``, or the captured output of a failure) shows them to a person.

    Returns:
        The line printed.
    """
    line = f"FIGURE {name}: " + ", ".join(f"{key}={value}" for key, value in figures.items())
    record_property(name, json.dumps(figures))
    print(f"\n{line}")
    return line


def sidecars(directory: Path) -> list[dict[str, Any]]:
    """The JSON sidecars of the traffic windows in ``directory``, by file name."""
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
"""The eight bytes every PNG file starts with."""


@dataclasses.dataclass(frozen=True, eq=False)
class Picture:
    """A decoded PNG, to assert what a plot shows rather than that it is a file.

    Checks go by colour and by position inside the axes frame, so they hold across fonts,
    antialiasing and small layout changes; no pixel-exact reference images.
    """

    pixels: np.ndarray
    """Red, green and blue in [0, 1]; rows top to bottom, columns left to right."""

    @classmethod
    def of(cls, png: bytes) -> Picture:
        """Decode PNG bytes (fails for anything that is not a PNG)."""
        assert png.startswith(PNG_SIGNATURE), png[:16]
        rgba = matplotlib.image.imread(io.BytesIO(png), format="png")
        return cls(np.asarray(rgba[..., :3], dtype=float))

    def colour_count(self) -> int:
        """How many distinct colours the picture has (1 for a blank figure)."""
        rgb = np.round(self.pixels * 255).astype(np.uint8).reshape(-1, 3)
        return len(np.unique(rgb, axis=0))

    def where(self, colour: str, tolerance: float = 0.06) -> np.ndarray:
        """Mask of the pixels within ``tolerance`` of a matplotlib colour ("C0", "tab:red")."""
        return np.abs(self.pixels - np.array(to_rgb(colour))).max(axis=-1) <= tolerance

    @staticmethod
    def bars(mask: np.ndarray, min_width: int = 1) -> list[int]:
        """The widths of the horizontal bars in ``mask``, top to bottom.

        A bar is a run of consecutive rows holding at least ``min_width`` of the mask's pixels
        (a larger ``min_width`` skips a legend's patch); its width is that of its widest row.
        """
        widths = mask.sum(axis=1)
        rows = np.flatnonzero(widths >= min_width)
        runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1) if len(rows) else []
        return [int(widths[run].max()) for run in runs]

    def frame(self) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)``: the axes frame, the longest dark rows and columns."""
        dark = self.pixels.sum(axis=-1) < 0.6
        rows, columns = dark.sum(axis=1), dark.sum(axis=0)
        tall = np.flatnonzero(columns > 0.5 * columns.max())
        wide = np.flatnonzero(rows > 0.5 * rows.max())
        return int(wide[0]), int(wide[-1]), int(tall[0]), int(tall[-1])

    def window(
        self, x: tuple[float, float] = (0.0, 1.0), y: tuple[float, float] = (0.0, 1.0)
    ) -> np.ndarray:
        """Mask of a window of the axes frame; ``x`` and ``y`` in fractions of the frame, ``y``
        upwards as on the plot's axis."""
        top, bottom, left, right = self.frame()
        rows, columns = np.indices(self.pixels.shape[:2])
        fx = (columns - left) / (right - left)
        fy = (bottom - rows) / (bottom - top)
        return (fx >= x[0]) & (fx <= x[1]) & (fy >= y[0]) & (fy <= y[1])

    def share(
        self,
        mask: np.ndarray,
        x: tuple[float, float] = (0.0, 1.0),
        y: tuple[float, float] = (0.0, 1.0),
    ) -> float:
        """The share of ``mask``'s pixels inside a window of the axes frame (0 for none)."""
        total = int(mask.sum())
        return float((mask & self.window(x, y)).sum() / total) if total else 0.0


def loan_records(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` demo loans as a client posts them to ``/predict``: the features, JSON nulls."""
    features = list(infer_feature_spec(generate_loans(300), "defaulted").features)
    frame = generate_loans(n, seed=seed)[features].astype(object)
    return json.loads(frame.where(frame.notna(), None).to_json(orient="records"))


class SmallDisk:
    """A file system of its own, 1 MiB, to fill up for real (writes then fail with ENOSPC)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._filler = directory / "filler"

    def fill(self) -> None:
        """Write a file until the disk is full."""
        descriptor = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(descriptor, b"\0" * 4096)
        except OSError as error:
            assert error.errno == 28, error  # ENOSPC: the disk is full
        finally:
            os.close(descriptor)

    def free(self) -> None:
        """Delete what :meth:`fill` wrote."""
        self._filler.unlink()


@contextlib.contextmanager
def small_disk(directory: Path) -> Iterator[SmallDisk]:
    """A 1 MiB tmpfs mounted at ``directory`` for the duration, unmounted after.

    Mounting needs root (as the sandbox and CI run); elsewhere the test is skipped, saying why.
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("a full disk is tested on a tmpfs of its own: no `mount` command here")
    if mounted.returncode != 0:
        pytest.skip(
            "a full disk is tested on a tmpfs of its own, which needs root to mount: "
            + mounted.stderr.strip()
        )
    try:
        yield SmallDisk(directory)
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def promote_rollout(
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    run_config: dict[str, Any] | None = None,
) -> dg.ExecuteInProcessResult:
    """Promote the challenger in rollout now and serve it (``rollout promote`` of the CLI).

    A challenger that passes the gate enters the release in shadow; tests of what follows a
    promotion take the operator's shortcut instead of waiting for live evidence.
    """
    from mlplatform.definitions import ASSETS

    config = {"action": "promote", "reason": "promoted by the test"}
    result = dg.materialize(
        ASSETS,
        selection=["rollout_report", "model_endpoint"],
        resources=resources,
        instance=instance,
        run_config={
            "ops": {
                **(run_config or {}).get("ops", {}),
                "rollout_report": {"config": config},
            }
        },
    )
    assert result.success
    return result


class BackgroundLoop(threading.Thread):
    """A test's loop on a thread of its own: started by ``with``, stopped and joined at its end.

    Subclasses implement :meth:`step`, one turn of the loop (a request, a poll), taken every
    ``interval_s`` until the ``with`` block ends.
    """

    interval_s = 0.05

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()

    def step(self) -> None:
        """One turn of the loop."""
        raise NotImplementedError

    def run(self) -> None:
        while not self.stop.is_set():
            self.step()
            time.sleep(self.interval_s)

    def __enter__(self) -> BackgroundLoop:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.join()
