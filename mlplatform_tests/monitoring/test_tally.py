"""A replica's tally: its counts outlive a process killed outright, and readers prefer them."""

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from mlplatform.monitoring.profiles import (
    ReplicaCounters,
    prune_traffic_windows,
    read_replica_counters,
    replica_tally_path,
    write_replica_counters,
)
from mlplatform.monitoring.tally import ReplicaTally, TallyCounts, read_tally

WRITER = """
import os, signal, sys
from pathlib import Path
from mlplatform.monitoring.tally import ReplicaTally, TallyCounts
tally = ReplicaTally(Path(sys.argv[1]))
for answered in range(1, 10_001):
    tally.update(TallyCounts(answered, 2 * answered, 1, 3, 5))
os.kill(os.getpid(), signal.SIGKILL)  # no exit handler, no flush: as kill -9 from outside
"""


@pytest.mark.faults
def test_the_counts_outlive_a_process_killed_outright(tmp_path):
    path = tmp_path / "replica.tally"
    writer = subprocess.run([sys.executable, "-c", WRITER, str(path)], check=False)
    assert writer.returncode == -signal.SIGKILL
    assert read_tally(path) == TallyCounts(10_000, 20_000, 1, 3, 5)


def test_a_missing_or_foreign_file_is_no_tally(tmp_path):
    assert read_tally(tmp_path / "none.tally") is None
    (tmp_path / "short.tally").write_bytes(b"12")
    assert read_tally(tmp_path / "short.tally") is None


def _counters(replica_id: str, answered_rows: int) -> ReplicaCounters:
    return ReplicaCounters("loans", "1", replica_id, 1, answered_rows, 0, 0, 0, 2, "2026-01-01")


def test_counters_take_the_tallys_counts_and_a_tally_alone_is_a_replica(tmp_path):
    write_replica_counters(tmp_path, _counters("written", 4))  # a few seconds behind its tally
    behind = ReplicaTally(replica_tally_path(tmp_path, "loans", "1", "written"))
    behind.update(TallyCounts(9, 12, 1, 2, 3))
    behind.close()
    killed_early = ReplicaTally(replica_tally_path(tmp_path, "loans", "1", "killed-early"))
    killed_early.update(TallyCounts(5, 7, 0, 0, 7))  # killed before its first JSON counters

    written, alone = sorted(
        read_replica_counters(tmp_path, "loans", "1"), key=lambda c: c.replica_id, reverse=True
    )
    assert (written.replica_id, written.recorder_restarts) == ("written", 2)
    assert (written.answered_requests, written.answered_rows) == (9, 12)
    assert (written.dropped_requests, written.dropped_rows, written.unsettled_rows) == (1, 2, 3)
    assert (alone.model_name, alone.model_version, alone.replica_id) == (
        "loans",
        "1",
        "killed-early",
    )
    assert (alone.answered_rows, alone.unsettled_rows, alone.recorder_restarts) == (7, 7, 0)
    assert datetime.fromisoformat(alone.updated_at) > datetime.now(UTC) - timedelta(minutes=5)
    killed_early.close()

    # Retention removes a tally with the counters, by age.
    old = (datetime.now(UTC) - timedelta(days=2)).timestamp()
    written_tally = replica_tally_path(tmp_path, "loans", "1", "written")
    for path in (written_tally, written_tally.with_suffix(".json"), killed_early.path):
        os.utime(path, (old, old))
    prune_traffic_windows(tmp_path, "loans", datetime.now(UTC) - timedelta(days=1))
    assert read_replica_counters(tmp_path, "loans", "1") == []
