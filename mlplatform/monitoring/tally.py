"""A replica's answered, dropped and unsettled counts, kept current to its last answer on disk.

The replica's JSON counters (:func:`~mlplatform.monitoring.profiles.write_replica_counters`) are
written every few seconds: a replica killed outright (``kill -9``, the out-of-memory killer)
would take the requests it answered since with it, uncounted, together with the records it was
still holding for the recorder. These counts live in a small memory-mapped file instead, updated
in memory with every answer (no system call, about a microsecond). The pages belong to the
kernel, not to the process, so the counts outlive the process however it dies; a crash of the
machine itself is another matter (they are flushed to disk by the kernel, not synced).

A single writer (the replica) updates the counts under a sequence number, odd while it writes,
so that a reader in another process never takes a half-written set of counts for a whole one.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path
from typing import NamedTuple

_LAYOUT = struct.Struct("<6q")  # the sequence number, then the counts of :class:`TallyCounts`
_READ_ATTEMPTS = 1000


class TallyCounts(NamedTuple):
    """One replica's counts: ``answered_rows = logged + dropped_rows + unsettled_rows``.

    For a replica that was killed, ``unsettled_rows`` are the records whose fate went with it:
    each is in the prediction log or was lost, and the log tells which (by request id).
    """

    answered_requests: int
    answered_rows: int
    dropped_requests: int
    dropped_rows: int
    unsettled_rows: int


class ReplicaTally:
    """The writer's side: one replica's :class:`TallyCounts` in a memory-mapped file."""

    def __init__(self, path: Path):
        """Create the file with its blocks allocated, and map it.

        The blocks are written, not only reserved (a sparse file): writing to a mapped page
        that has no block on a full disk would kill the process with ``SIGBUS``.

        Raises:
            OSError: if the file cannot be created (then the replica keeps only its JSON counters).

        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(descriptor, bytes(_LAYOUT.size))
            os.fsync(descriptor)
            self._map = mmap.mmap(descriptor, _LAYOUT.size)
        finally:
            os.close(descriptor)
        self._sequence = 0

    def update(self, counts: TallyCounts) -> None:
        """Replace the counts (the caller serializes its updates: one writer at a time)."""
        self._sequence += 1  # odd: being written
        _LAYOUT.pack_into(self._map, 0, self._sequence, *counts)
        self._sequence += 1
        struct.pack_into("<q", self._map, 0, self._sequence)

    def close(self) -> None:
        """Unmap the file (it stays, with the last counts)."""
        self._map.close()


def read_tally(path: Path) -> TallyCounts | None:
    """A replica's last counts, or ``None`` if it has no tally file (or an unreadable one).

    Raises:
        TimeoutError: if the writer never held still long enough to read a whole set of counts.

    """
    try:
        data = Path(path).read_bytes
        for _ in range(_READ_ATTEMPTS):
            raw = data()
            if len(raw) != _LAYOUT.size:
                return None
            sequence, *counts = _LAYOUT.unpack(raw)
            if sequence % 2 == 0 and struct.unpack_from("<q", data())[0] == sequence:
                return TallyCounts(*counts)
            time.sleep(0.001)
    except FileNotFoundError:
        return None
    raise TimeoutError(f"the counts in {path} kept changing while being read")
