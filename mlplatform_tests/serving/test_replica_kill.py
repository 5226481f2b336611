"""The replica is killed outright (SIGKILL) under steady load: Ray Serve starts another, clients
are answered again, at most the requests in flight fail, and every record the killed replica
answered is in the prediction log or counted on disk (its tally outlives it).

Real Ray Serve over HTTP, a real process killed, real SQLite.
"""

import functools
import os
import signal
import threading
import time

import httpx
import pytest

from mlplatform.monitoring.feedback import FeedbackStore
from mlplatform.monitoring.profiles import read_replica_counters
from mlplatform_tests.support import (
    RunningThreads,
    deployed,
    loan_records,
    recorded_serving,
    report_figure,
    train_champion,
    wait_for,
)

pytestmark = pytest.mark.faults

APP = "replica-kill"
CLIENTS = 4


@pytest.fixture(scope="module")
def endpoint(serve_port: int, tmp_path_factory: pytest.TempPathFactory):
    """A champion served by one replica, with the prediction log, on an app of its own."""
    settings, _ = train_champion(tmp_path_factory.mktemp("replica-kill-home"), seed=6)
    with deployed(recorded_serving(settings, traffic_window_s=2), serve_port, APP) as url:
        yield {"url": url, "settings": settings}


class _Load(RunningThreads):
    """Clients each sending one single-record request after another, noting every outcome."""

    def __init__(self, url: str):
        self.url = url
        self.records = loan_records(200, seed=5)
        self.lock = threading.Lock()
        # (when sent, when answered, client, request id)
        self.answered: list[tuple[float, float, int, str]] = []
        self.failed: list[tuple[float, int, str]] = []  # (when sent, client, what)
        super().__init__([functools.partial(self._send, n) for n in range(CLIENTS)])

    def _send(self, client_number: int) -> None:
        i = client_number
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                record = self.records[i % len(self.records)]
                i += CLIENTS
                sent_at = time.monotonic()
                try:
                    answer = client.post(f"{self.url}/predict", json={"records": [record]})
                except httpx.HTTPError as error:
                    with self.lock:
                        self.failed.append((sent_at, client_number, type(error).__name__))
                    continue
                with self.lock:
                    if answer.status_code == 200:
                        request_id = answer.json()["request_id"]
                        self.answered.append((sent_at, time.monotonic(), client_number, request_id))
                    else:
                        self.failed.append((sent_at, client_number, f"HTTP {answer.status_code}"))

    def first_answers_sent_after(self, when: float) -> dict[int, float]:
        """Per client, when it was first answered (200) to a request sent after ``when``.

        A request sent after the replica was killed is answered by its successor: answers
        already on their way when it died do not count as recovered.
        """
        first: dict[int, float] = {}
        with self.lock:
            for sent_at, answered_at, client, _ in self.answered:
                if sent_at > when:
                    first[client] = min(first.get(client, answered_at), answered_at)
        return first


def _health(url: str) -> dict:
    return httpx.get(f"{url}/healthz", timeout=30).json()


def _counters(settings) -> dict:
    """Every replica's counters on disk, by replica id."""
    found = read_replica_counters(settings.traffic_dir, "mlplatform", "1")
    return {counters.replica_id: counters for counters in found}


def test_a_killed_replica_is_replaced_and_what_it_answered_is_logged_or_counted(
    endpoint, record_property
):
    url, settings = endpoint["url"], endpoint["settings"]
    killed_pid = _health(url)["pid"]
    with _Load(url) as load:
        wait_for(lambda: len(load.answered) > 200, timeout=60)  # steady load
        (killed_id,) = _counters(settings)  # the replica's tally is there from its start
        killed_at = time.monotonic()
        os.kill(killed_pid, signal.SIGKILL)
        wait_for(lambda: len(load.first_answers_sent_after(killed_at)) == CLIENTS, timeout=120)
        recovered_s = max(load.first_answers_sent_after(killed_at).values()) - killed_at
        time.sleep(2)  # the new replica serves a while
    assert _health(url)["pid"] != killed_pid

    # What failed: the requests in flight when the process died, and those sent before HAProxy
    # learned that its only server was gone (the connection reset, or its retries exhausted:
    # 500). None after: once a client was answered by the successor, nothing of it failed.
    in_flight = [f for f in load.failed if f[0] < killed_at]
    sent_after = [f for f in load.failed if f[0] >= killed_at]
    assert len(in_flight) <= CLIENTS, load.failed
    recovered = load.first_answers_sent_after(killed_at)
    assert all(sent_at < recovered[client] for sent_at, client, _ in load.failed), load.failed
    answered_ids = [request_id for _, _, _, request_id in load.answered]
    assert len(set(answered_ids)) == len(answered_ids)

    # The successor settles everything it answered; the killed replica's counts are its last.
    wait_for(lambda: _health(url)["traffic"]["unsettled_rows"] == 0, timeout=60)
    wait_for(
        lambda: sum(c.answered_rows for c in _counters(settings).values()) >= len(answered_ids),
        timeout=30,
    )
    by_replica = _counters(settings)
    assert len(by_replica) == 2
    killed = by_replica.pop(killed_id)
    (successor,) = by_replica.values()
    assert successor.unsettled_rows == 0
    platform_answered = killed.answered_rows + successor.answered_rows
    # Counted when answered: a request whose answer died with the process counts, unseen.
    assert len(answered_ids) <= platform_answered <= len(answered_ids) + len(load.failed)

    # Every record answered and not in the prediction log is counted on disk: dropped, or
    # unsettled in the killed replica (it went with it).
    logged = FeedbackStore(settings.feedback_db).logged_requests(answered_ids)
    lost = len(answered_ids) - len(logged)
    counted = killed.dropped_rows + killed.unsettled_rows + successor.dropped_rows
    assert lost <= counted
    report_figure(
        record_property,
        "replica_killed",
        in_flight_at_kill=CLIENTS,
        failed_requests=len(load.failed),
        failed_in_flight=len(in_flight),
        failed_sent_after_kill=len(sent_after),
        recovery_s=f"{recovered_s:.1f}",
        rows_answered_200=len(answered_ids),
        rows_counted_answered=platform_answered,
        rows_logged=len(logged),
        rows_lost=lost,
        rows_lost_counted=counted,
        killed_replica_unsettled=killed.unsettled_rows,
    )
