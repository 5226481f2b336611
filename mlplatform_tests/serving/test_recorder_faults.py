"""The recorder process dies under traffic: requests are still answered, /healthz reports it down
then back, and every answered record is in the prediction log or counted as dropped.

Real Ray Serve over HTTP, a real actor killed as if it crashed (Ray restarts it) and for good
(the replica starts a new one), real SQLite.
"""

import functools
import time
from pathlib import Path

import httpx
import pytest
import ray

from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.monitoring.profiles import (
    list_traffic_windows,
    read_replica_counters,
    version_directory,
)
from mlplatform.serving import cluster
from mlplatform.serving.recording import RECORDER_NAMESPACE, recorder_name
from mlplatform_tests.support import (
    RunningThreads,
    loan_records,
    recorded_serving,
    report_figure,
    train_champion,
    wait_for,
)

pytestmark = pytest.mark.faults

PREFIX = "/faults"


@pytest.fixture(scope="module")
def recorded_endpoint(serve_port: int, tmp_path_factory: pytest.TempPathFactory):
    """A champion served with traffic profiling and the prediction log: 2-second windows, and
    room for only 20 requests to wait, so that some are dropped while the recorder is down."""
    settings, _ = train_champion(tmp_path_factory.mktemp("recorder-faults-home"), seed=6)
    serving = recorded_serving(settings, traffic_window_s=2, traffic_max_queue=20)
    cluster.deploy(
        serving,
        ray_address=None,
        host="127.0.0.1",
        port=serve_port,
        app_name="faults",
        local_head=None,
        route_prefix=PREFIX,
    )
    url = f"http://127.0.0.1:{serve_port}{PREFIX}"
    cluster.wait_until_serving(url, "1")
    yield {"url": url, "settings": settings}
    from ray import serve

    serve.delete("faults")


class _Traffic(RunningThreads):
    """Clients sending single records and small batches, and one watching /healthz."""

    def __init__(self, url: str):
        self.url = url
        self.records = loan_records(200, seed=3)
        self.answers: list[tuple[int, int]] = []  # (HTTP status, records)
        self.health: list[tuple[float, int, str | None]] = []  # (when, HTTP status, recorder)
        super().__init__([functools.partial(self._send, seed) for seed in range(2)] + [self._watch])

    def _send(self, seed: int) -> None:
        with httpx.Client(timeout=30) as client:
            i = seed
            while not self.stop.is_set():
                size = 1 if i % 3 else 5
                batch = self.records[i % 190 : i % 190 + size]
                answer = client.post(f"{self.url}/predict", json={"records": batch})
                self.answers.append((answer.status_code, len(batch)))
                i += 2
                time.sleep(0.02)

    def _watch(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                answer = client.get(f"{self.url}/healthz")
                status = answer.json()["traffic"]["status"] if answer.status_code == 200 else None
                self.health.append((time.monotonic(), answer.status_code, status))
                time.sleep(0.1)

    def seen(self, status: str, after: float) -> float | None:
        """When /healthz first showed the recorder ``status`` after ``after``."""
        return next((t for t, _, s in self.health if t > after and s == status), None)


def _kill_and_wait(traffic: _Traffic, recorder, no_restart: bool) -> tuple[float, float]:
    """Kill the recorder process; seconds until /healthz showed it down, and back."""
    killed_at = time.monotonic()
    ray.kill(recorder, no_restart=no_restart)
    wait_for(lambda: traffic.seen("down", killed_at) is not None, timeout=60)
    down_at = traffic.seen("down", killed_at)
    wait_for(lambda: traffic.seen("ok", down_at) is not None, timeout=120)
    return down_at - killed_at, traffic.seen("ok", down_at) - killed_at


def test_a_killed_recorder_comes_back_and_every_answered_row_is_logged_or_counted(
    recorded_endpoint, record_property
):
    url, settings = recorded_endpoint["url"], recorded_endpoint["settings"]
    replicas = version_directory(settings.traffic_dir, "mlplatform", "1") / "replicas"
    with _Traffic(url) as traffic:
        # The replica writes its counters within seconds of its first traffic: they name it.
        wait_for(lambda: any(replicas.glob("*.json")), timeout=60)
        (replica_id,) = [Path(p).stem for p in replicas.glob("*.json")]
        recorder = ray.get_actor(recorder_name(replica_id), namespace=RECORDER_NAMESPACE)

        answered_before = len(traffic.answers)
        restarted = _kill_and_wait(traffic, recorder, no_restart=False)  # Ray restarts it
        answered_while_down = len(traffic.answers) - answered_before
        time.sleep(2)
        recreated = _kill_and_wait(traffic, recorder, no_restart=True)  # the replica does
        time.sleep(2)  # and traffic goes on

    assert answered_while_down > 0
    assert {status for status, _ in traffic.answers} == {200}
    assert {status for _, status, _ in traffic.health} == {200}
    answered = sum(rows for _, rows in traffic.answers)

    def settled() -> dict:
        shown = httpx.get(f"{url}/healthz", timeout=30).json()["traffic"]
        return shown if shown["unsettled_rows"] == 0 else {}

    wait_for(lambda: bool(settled()), timeout=60)
    final = settled()
    logged = FeedbackStore(settings.feedback_db).count()
    assert final["status"] == "ok" and final["restarts"] == 2
    assert final["answered_rows"] == answered
    assert final["dropped_rows"] > 0  # the 20 waiting requests overflowed while it was down
    assert logged + final["dropped_rows"] == answered
    # The same counts are kept on disk, where they outlive the replica.
    wait_for(
        lambda: (
            read_replica_counters(settings.traffic_dir, "mlplatform", "1")[0].dropped_rows
            == final["dropped_rows"]
            and read_replica_counters(settings.traffic_dir, "mlplatform", "1")[0].answered_rows
            == answered
        ),
        timeout=30,
    )
    time.sleep(3)  # the last 2-second window is written
    profiled = sum(w.rows for w in list_traffic_windows(settings.traffic_dir, "mlplatform", "1"))
    report_figure(
        record_property,
        "recorder_killed",
        restarted_down_s=f"{restarted[0]:.1f}",
        restarted_back_s=f"{restarted[1]:.1f}",
        recreated_down_s=f"{recreated[0]:.1f}",
        recreated_back_s=f"{recreated[1]:.1f}",
        failed_requests=0,
        rows_answered=answered,
        rows_logged=logged,
        rows_counted_dropped=final["dropped_rows"],
        rows_profiled=profiled,
    )
