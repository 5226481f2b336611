"""The Ray head dies under the real Dagster daemon, then the machine "reboots": the endpoint comes
back with the champion each time, by `endpoint_sensor` alone.

One platform home on free ports, trained once by ``python -m mlplatform run``. ``make ui``'s
command (``dagster dev``: web server and daemon) runs as a process group of its own; the Ray head
the platform started is killed by its process group (SIGKILL), as a crash would; then everything
is stopped (``python -m mlplatform stop``, the daemon) and only ``make ui``'s command is started
again. Every process started here is stopped by its process group at the end, also on failure.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import httpx
import pytest

from mlplatform.serving.cluster import LOOPBACK, LocalHead, port_is_open
from mlplatform_tests.support import (
    PLATFORM_VARIABLES,
    free_port,
    loan_records,
    report_figure,
)

pytestmark = [pytest.mark.faults, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
CHECK_S = 5
"""The endpoint sensor's interval here (``MLPLATFORM_ENDPOINT_CHECK_S``)."""


class _Platform:
    """A platform home on free ports, and ``make ui``'s command, started and stopped by group."""

    def __init__(self, home: Path, data: Path):
        self.home = home
        self.serve_port, self.ray_port, self.ui_port = free_port(), free_port(), free_port()
        self.url = f"http://{LOOPBACK}:{self.serve_port}"
        environment = {
            key: value
            for key, value in os.environ.items()
            if key not in PLATFORM_VARIABLES and not key.startswith("RAY_AUTH")
        }
        self.env = environment | {
            "MLPLATFORM_HOME": str(home),
            "DAGSTER_HOME": str(home / "dagster"),
            "MLPLATFORM_SOURCE": str(data),
            "MLPLATFORM_TARGET": "defaulted",
            "MLPLATFORM_SERVE_PORT": str(self.serve_port),
            "MLPLATFORM_RAY_PORT": str(self.ray_port),
            "MLPLATFORM_METRICS_PORT": str(free_port()),
            "MLPLATFORM_ENDPOINT_CHECK_S": str(CHECK_S),
        }
        (home / "dagster").mkdir(parents=True)
        shutil.copy(REPO / "dagster.yaml", home / "dagster" / "dagster.yaml")
        self.head = LocalHead(self.ray_port, home / "ray")
        self.ui: subprocess.Popen | None = None
        self.ui_starts = 0
        self.head_sessions: set[int] = set()  # every head this home started, to clean up

    def command(self, *args: str) -> None:
        """``python -m mlplatform <args>``, output kept in the platform home."""
        with (self.home / f"{args[0]}.log").open("a") as log:
            subprocess.run(
                [sys.executable, "-m", "mlplatform", *args],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=900,
            )

    def start_ui(self) -> None:
        """``make ui``'s command, in a process group of its own."""
        self.ui_starts += 1
        dagster = Path(sys.executable).parent / "dagster"
        command = [str(dagster), "dev", "-w", "workspace.yaml", "-h", LOOPBACK]
        with (self.home / f"ui-{self.ui_starts}.log").open("w") as log:
            self.ui = subprocess.Popen(
                [*command, "-p", str(self.ui_port)],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop_ui(self, timeout_s: float = 60.0) -> None:
        """Stop ``dagster dev`` and everything in its process group (SIGTERM, then SIGKILL)."""
        if self.ui is None:
            return
        group, self.ui = self.ui.pid, None
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
        os.killpg(group, signal.SIGKILL)

    def stop_head(self) -> None:
        """``python -m mlplatform stop``; then whatever is left of the head's process group."""
        subprocess.run(
            [sys.executable, "-m", "mlplatform", "stop"], env=self.env, cwd=REPO, timeout=120
        )
        if self.head.process_group_path.exists():  # recorded by this platform home's head
            self.head_sessions.add(self.head_group())
        # Ray's workers run in process groups of their own, in the head's session; they exit
        # when they lose the head, and whatever is left after a while is killed.
        for session in self.head_sessions:
            with contextlib.suppress(AssertionError):
                _until(lambda s=session: not _session_processes(s), 30)
            for pid in _session_processes(session):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def head_group(self) -> int:
        """The process group (and session) of the Ray head this platform home started."""
        group = int(self.head.process_group_path.read_text())
        self.head_sessions.add(group)
        return group

    def answer(self) -> dict | None:
        """A ``/predict`` answer of one record, or ``None`` while the endpoint does not give one."""
        try:
            response = httpx.post(
                f"{self.url}/predict", json={"records": loan_records(1, seed=8)}, timeout=10
            )
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def deploys(self) -> list[dg.RunRecord]:
        """The endpoint sensor's deploy runs, oldest first."""
        with dg.DagsterInstance.from_config(str(self.home / "dagster")) as instance:
            records = instance.get_run_records(
                dg.RunsFilter(job_name="deploy_job", tags={"mlplatform/trigger": "endpoint"})
            )
        return sorted(records, key=lambda record: record.create_timestamp)

    def idle(self) -> bool:
        """No run queued or running (a run's own process must not outlive the daemon)."""
        with dg.DagsterInstance.from_config(str(self.home / "dagster")) as instance:
            return not instance.get_run_records(
                dg.RunsFilter(
                    statuses=[
                        dg.DagsterRunStatus.QUEUED,
                        dg.DagsterRunStatus.NOT_STARTED,
                        dg.DagsterRunStatus.STARTING,
                        dg.DagsterRunStatus.STARTED,
                    ]
                )
            )

    def sensor_ticks(self, after: float) -> list:
        """``endpoint_sensor``'s ticks since ``after`` (unix seconds), oldest first."""
        with dg.DagsterInstance.from_config(str(self.home / "dagster")) as instance:
            states = [s for s in instance.all_instigator_state() if s.name == "endpoint_sensor"]
            if not states:  # it has not ticked yet
                return []
            (state,) = states
            ticks = instance.get_ticks(
                state.instigator_origin_id, state.selector_id, after=float(after), limit=100
            )
        return sorted(ticks, key=lambda tick: tick.timestamp)


@pytest.fixture
def live_platform(tmp_path: Path, small_loans_csv: Path) -> Iterator[_Platform]:
    """A trained platform with its endpoint live; its daemon and Ray head stopped at the end."""
    started = _Platform(tmp_path / "platform", small_loans_csv)
    try:
        started.command("run")
        yield started
    finally:
        started.stop_ui()
        started.stop_head()


def _session_processes(session: int) -> list[int]:
    """The processes of a session (a Ray head started by this test, and its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getsid(int(entry.name)) == session:
                    found.append(int(entry.name))
    return found


def _until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Check ``condition`` twice a second (each check opens an instance or sends a request)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s:.0f} s")
        time.sleep(0.5)


def _serving_champion(platform: _Platform, timeout_s: float) -> float:
    """Wait until ``/predict`` answers with v1; when it did (monotonic seconds)."""
    _until(lambda: (platform.answer() or {}).get("model_version") == "1", timeout_s)
    return time.monotonic()


def test_the_endpoint_comes_back_after_a_head_crash_and_a_reboot_by_the_daemon_alone(
    live_platform, record_property
):
    platform = live_platform
    assert platform.answer()["model_version"] == "1"
    platform.start_ui()
    # The daemon is up once the sensor has finished a tick (in sync: no run requested).
    _until(
        lambda: any(
            (tick.skip_reason or "").startswith("In sync") for tick in platform.sensor_ticks(0)
        ),
        600,
    )
    assert not platform.deploys()

    # 1. The Ray head crashes: its process group is killed. Its workers (the replica, HAProxy)
    # have groups of their own and exit on losing it: the endpoint goes down within seconds.
    killed_at, killed_unix = time.monotonic(), time.time()
    os.killpg(platform.head_group(), signal.SIGKILL)
    _until(lambda: not port_is_open(LOOPBACK, platform.ray_port), 30)
    _until(lambda: platform.answer() is None, 120)
    down_s = time.monotonic() - killed_at
    answered_at = _serving_champion(platform, timeout_s=600)
    crash_s = answered_at - killed_at
    (deploy,) = platform.deploys()
    requested_s = deploy.create_timestamp.timestamp() - killed_unix
    # The ticks after the last one that saw the endpoint in sync before the kill.
    ticks = platform.sensor_ticks(0)
    in_sync = [
        i
        for i, tick in enumerate(ticks)
        if tick.timestamp < killed_unix and (tick.skip_reason or "").startswith("In sync")
    ]
    ticks = ticks[in_sync[-1] + 1 :]
    requesting = [i for i, tick in enumerate(ticks) if tick.run_ids]
    assert requesting and requesting[0] <= 1, [(t.timestamp, t.skip_reason) for t in ticks]
    assert deploy.dagster_run.tags["mlplatform/endpoint-state"].startswith(
        "The champion is v1 but the endpoint is"
    )

    # 2. A reboot: the daemon and the head stop; only `make ui`'s command starts again.
    _until(platform.idle, 300)
    platform.stop_ui()
    platform.command("stop")
    assert not port_is_open(LOOPBACK, platform.ray_port)
    assert platform.answer() is None
    rebooted_at = time.monotonic()
    platform.start_ui()
    reboot_s = _serving_champion(platform, timeout_s=600) - rebooted_at
    assert len(platform.deploys()) == 2
    _until(platform.idle, 300)

    report_figure(
        record_property,
        "ray_head_killed",
        sensor_interval_s=CHECK_S,
        endpoint_down_after_s=f"{down_s:.1f}",
        deploy_requested_after_s=f"{requested_s:.1f}",
        requested_on_tick=requesting[0] + 1,
        answering_after_s=f"{crash_s:.1f}",
    )
    report_figure(record_property, "reboot_make_ui_only", answering_after_s=f"{reboot_s:.1f}")
