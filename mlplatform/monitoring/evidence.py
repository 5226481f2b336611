"""Live evidence of each version of a release, per rollout stage, as replicas write it to disk.

Every replica counts, per model version and per stage of the rollout under way, the requests the
version scored (answered, or scored beside the champion in shadow), the ones it failed, and the
latency of its scoring in fixed buckets; it writes these counts every few seconds, whole and
durably, to::

    <directory>/<model_name>/rollouts/<rollout_id>/<stage>/v<version>/<replica_id>.json

The rollout's judge (:func:`read_stage_counts`) sums the replicas' files of a stage: counts add
up across replicas and restarts (a replica restarted by Ray has a new id, hence a new file), and
the 99th percentile is read from the summed buckets, the way Prometheus reads a histogram.
A replica killed outright loses at most its last few seconds of counts. Nothing here imports
Dagster or Ray.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from mlplatform.monitoring.durable import write_atomically
from mlplatform.monitoring.profiles import path_part

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
)  # fmt: skip
"""Upper bounds of the scoring-latency buckets, in milliseconds (one more bucket above them)."""


@dataclasses.dataclass
class VersionCounts:
    """What one version scored in one stage: requests, failures, latency buckets.

    Attributes:
        requests: requests the version scored (answered them, or scored them in shadow).
        errors: of those, the ones whose scoring failed.
        latency_buckets: requests per latency bucket (:data:`LATENCY_BUCKETS_MS`, then above).

    """

    requests: int = 0
    errors: int = 0
    latency_buckets: list[int] = dataclasses.field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1)
    )

    def add(self, requests: int, errors: int, latency_ms: float) -> None:
        """Count ``requests`` scored together in ``latency_ms``, ``errors`` of them failed."""
        self.requests += requests
        self.errors += errors
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += requests

    def merged(self, other: VersionCounts) -> VersionCounts:
        """The counts of both (two replicas, say)."""
        return VersionCounts(
            self.requests + other.requests,
            self.errors + other.errors,
            [a + b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)],
        )

    def quantile_ms(self, quantile: float) -> float | None:
        """A latency quantile (see :func:`bucket_quantile_ms`); ``None`` before any request."""
        return bucket_quantile_ms(self.latency_buckets, quantile)

    @property
    def p99_ms(self) -> float | None:
        """The 99th percentile of the scoring latency, in milliseconds."""
        return self.quantile_ms(0.99)

    def to_json(self) -> bytes:
        """The counts as they are written to disk."""
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> VersionCounts:
        """Counts written by :meth:`to_json`.

        Raises:
            ValueError: if ``raw`` is not such counts.

        """
        data = json.loads(raw)
        counts = cls(int(data["requests"]), int(data["errors"]), list(data["latency_buckets"]))
        if len(counts.latency_buckets) != len(LATENCY_BUCKETS_MS) + 1:
            raise ValueError(f"{len(counts.latency_buckets)} latency buckets")
        return counts


def bucket_quantile_ms(buckets: Sequence[int], quantile: float) -> float | None:
    """A latency quantile from requests per bucket (:data:`LATENCY_BUCKETS_MS`, then above).

    Interpolated within its bucket, as Prometheus reads a histogram; above the last bound the
    last bound is returned (a lower bound of the truth). ``None`` when no request is counted.
    """
    total = sum(buckets)
    if not total:
        return None
    rank = quantile * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index == len(LATENCY_BUCKETS_MS):
                return LATENCY_BUCKETS_MS[-1]
            low = LATENCY_BUCKETS_MS[index - 1] if index else 0.0
            high = LATENCY_BUCKETS_MS[index]
            return low + (high - low) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS_MS[-1]


def requests_slower_than(buckets: Sequence[int], bound_ms: float) -> float:
    """How many of the counted requests took longer than ``bound_ms``.

    Every request of the buckets above the bound, and the share of the bucket holding it that
    lies above it (requests spread evenly within a bucket, as :func:`bucket_quantile_ms`
    reads them). The last bucket has no upper end: it counts whole below its lower end, and
    not at all above it (a lower bound of the truth).
    """
    slower = 0.0
    for index, count in enumerate(buckets):
        low = LATENCY_BUCKETS_MS[index - 1] if index else 0.0
        if index == len(LATENCY_BUCKETS_MS):
            slower += count if bound_ms < low else 0.0
            continue
        high = LATENCY_BUCKETS_MS[index]
        if bound_ms <= low:
            slower += count
        elif bound_ms < high:
            slower += count * (high - bound_ms) / (high - low)
    return slower


def stage_directory(
    directory: Path, model_name: str, rollout_id: str, stage: str, version: str
) -> Path:
    """Where the replicas write one version's counts of one stage of a rollout."""
    return (
        Path(directory)
        / path_part(model_name, "model name")
        / "rollouts"
        / path_part(rollout_id, "rollout id")
        / path_part(stage, "stage")
        / f"v{path_part(version, 'model version')}"
    )


def write_counts(
    directory: Path,
    model_name: str,
    rollout_id: str,
    stage: str,
    version: str,
    replica_id: str,
    counts: VersionCounts,
) -> Path:
    """Write one replica's counts of a version in a stage, whole and durably."""
    path = stage_directory(directory, model_name, rollout_id, stage, version)
    return write_atomically(path / f"{path_part(replica_id, 'replica id')}.json", counts.to_json())


def read_stage_counts(
    directory: Path, model_name: str, rollout_id: str, stage: str, version: str
) -> VersionCounts:
    """The counts of a version in a stage, summed over every replica that wrote any.

    A file that cannot be read (cut short by a full disk, say) is skipped with a warning: the
    others still count.
    """
    total = VersionCounts()
    for counts in _readable(stage_directory(directory, model_name, rollout_id, stage, version)):
        total = total.merged(counts)
    return total


def _readable(directory: Path) -> Iterable[VersionCounts]:
    for path in sorted(directory.glob("*.json")):
        try:
            yield VersionCounts.from_json(path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("skipping unreadable rollout counts %s: %s", path, error)
