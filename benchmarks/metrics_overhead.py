"""What the endpoint's Prometheus metrics add to a single-record request, in CPU microseconds.

The per-request work of :mod:`mlplatform.serving.metrics`, each part timed on its own over many
repetitions (the median of several rounds):

- the ASGI middleware around an app that answers at once with the version headers, against the
  same app bare (reading the status and headers, timing, counting the request);
- counting one record's prediction and score (a micro-batch counts its records in one call, so
  this is the most a single-record request pays);
- the flushing thread's share: handing one request's latency and counts to Ray's metric objects.

An end-to-end comparison cannot resolve a few microseconds on a request that costs a replica
about 1.1 ms of CPU (benchmarks/RESULTS.md, single records) with run-to-run noise of several
percent; the sum printed here, against that 1.1 ms, bounds the throughput the metrics take.

    python benchmarks/metrics_overhead.py [--repeat 100000] [--rounds 5]
"""

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import mlplatform.serving  # noqa: F401  (Ray's loopback settings before Ray is imported)
from mlplatform.serving.metrics import EndpointMetrics, RequestMetricsMiddleware

REPLICA_CPU_PER_REQUEST_US = 1080.0  # benchmarks/RESULTS.md: 817 req/s at 88% of a core
HEADERS = [(b"content-type", b"application/json"), (b"x-model-version", b"1")]
SCOPE = {"type": "http", "path": "/predict"}


async def _answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": b"{}"})


async def _send(message: dict[str, Any]) -> None:
    return None


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


def _per_call(call: Callable[[], Any], repeat: int) -> float:
    started = time.process_time()
    for _ in range(repeat):
        call()
    return (time.process_time() - started) / repeat * 1e6


def _per_request(app: Any, repeat: int) -> float:
    async def run() -> float:
        started = time.process_time()
        for _ in range(repeat):
            await app(SCOPE, _receive, _send)
        return (time.process_time() - started) / repeat * 1e6

    return asyncio.run(run())


def main() -> None:
    """Time each part and print them with their sum."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=100_000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (the median is kept)")
    args = parser.parse_args()
    metrics = EndpointMetrics("mlplatform")
    wrapped = RequestMetricsMiddleware(_answer, metrics, "1")
    parts: dict[str, list[float]] = {"middleware": [], "prediction": [], "flush": []}
    for _ in range(args.rounds):
        parts["middleware"].append(
            _per_request(wrapped, args.repeat) - _per_request(_answer, args.repeat)
        )
        metrics.take()
        parts["prediction"].append(
            _per_call(
                lambda: metrics.observe_predictions("1", "champion", [1], [0.73]), args.repeat
            )
        )
        for _ in range(args.repeat):
            metrics.observe_request("1", "champion", 200, 0.001)
        parts["flush"].append(_per_call(metrics.flush, 1) / args.repeat)
    total = 0.0
    for name, values in parts.items():
        median = statistics.median(values)
        total += median
        print(f"{name}: {median:.2f} us ({min(values):.2f}-{max(values):.2f})")
    share = total / REPLICA_CPU_PER_REQUEST_US
    print(f"per single-record request: {total:.1f} us, {share:.1%} of a replica's 1.08 ms")


if __name__ == "__main__":
    main()
