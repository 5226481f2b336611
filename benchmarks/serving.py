"""Serving performance: the endpoint `make run` deploys against a plain FastAPI server, same model.

Trains and registers the demo model with ``python -m mlplatform run`` in a temporary platform home,
on a Ray head started here in the foreground with the environment the platform gives its own head
(``cluster.LocalHead.environment()``), so the endpoint measured is exactly the default deployment
(EndpointConfig defaults, traffic profiling on). Starts ``benchmarks/baseline_server.py`` (FastAPI
+ uvicorn, one worker) on the same registered model. Then, alternating the two servers round by
round with a closed-loop async client (aiohttp, a separate process, one connection per worker):

- single-record requests at concurrency 1, 8 and 32: requests/s, p50 and p99 latency;
- 1,000-record requests at concurrency 1: rows/s, against the in-process ``predict`` of the same
  rows (the model alone, in this process);
- the endpoint with and without traffic profiling (a second app with ``traffic_dir=None`` at
  ``/noprofile``, alternating), at concurrency 32;
- startup to the first 200: the baseline from process start; ours as a new deployment on the
  running head (replica processes, model load, HAProxy reload) and the head's own start;
- every non-200 answer or client error is counted: the endpoint must have none.

Appends a dated section to benchmarks/RESULTS.md (machine, load average, versions, medians with
min-max over rounds, ratios against the targets). Every process it starts is stopped by pid.

With ``--release-cost`` it measures what a rollout costs instead: ``python -m mlplatform run``
twice (v1, v2), then three apps of the default deployment side by side on the same head, each
serving a release: v1 alone, v1 with v2 in canary (v2 answers 20% of the requests) and v1 with
v2 in shadow (v2 scores every request after the answer left, its predictions logged); single
records from ``--concurrency`` closed-loop clients, the three alternating round by round.

    python benchmarks/serving.py [--duration-s 6] [--rounds 3] [--keep] [--no-record]
    python benchmarks/serving.py --release-cost [--concurrency 16] [--rounds 3]
"""

import argparse
import asyncio
import collections
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from processes import LOOPBACK, REPO, free_port, start, stop, wait_for_port

if TYPE_CHECKING:
    from mlplatform.serving.cluster import LocalHead
    from mlplatform.serving.release import Release

RESULTS = REPO / "benchmarks" / "RESULTS.md"
CONCURRENCIES = (1, 8, 32)
BATCH_ROWS = 1_000
RELEASE_TARGETS = {"canary": 0.90, "shadow": 0.75}  # req/s as a share of the one-model release
CANARY_SHARE = 0.2
TARGETS = {
    "ratio_32": 1.0,  # single records at concurrency 32: >= 1.0x the baseline's requests/s
    "p99_32_ms": 30.0,
    "p50_1_ms": 2.0,
    "rows_share": 0.5,  # 1,000-record requests: >= 50% of in-process predict rows/s
    "profiling_cost": 0.05,  # traffic profiling costs <= 5% of the endpoint's requests/s
}


# --- the load generator (runs in its own process: `serving.py client ...`) ----------------------


async def closed_loop(
    url: str, bodies: list[bytes], concurrency: int, duration_s: float, warmup_s: float
) -> dict[str, Any]:
    """``concurrency`` workers, each posting the next body as soon as its answer is read.

    Returns:
        Completions within the measured window (after the warm-up): requests/s, latency
        quantiles; and every non-200 answer or client error of the whole run.

    """
    import aiohttp

    headers = {"content-type": "application/json"}
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup_s
    stop_at = measure_from + duration_s
    latencies: list[float] = []
    failures: collections.Counter[str] = collections.Counter()
    sent = 0

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
    ) as session:

        async def worker(offset: int) -> None:
            nonlocal sent
            index = offset
            while loop.time() < stop_at:
                body = bodies[index % len(bodies)]
                index += concurrency
                started = loop.time()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            failures[f"HTTP {response.status}"] += 1
                except (aiohttp.ClientError, TimeoutError) as error:
                    failures[type(error).__name__] += 1
                finished = loop.time()
                sent += 1
                if measure_from <= finished <= stop_at:
                    latencies.append(finished - started)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    latencies.sort()
    count = len(latencies)
    return {
        "requests_per_s": count / duration_s,
        "p50_ms": 1000 * latencies[count // 2] if count else float("nan"),
        "p99_ms": 1000 * latencies[min(count - 1, int(count * 0.99))] if count else float("nan"),
        "measured": count,
        "sent": sent,
        "failures": dict(failures),
    }


def client_main(argv: list[str]) -> None:
    """``client URL CONCURRENCY DURATION_S WARMUP_S BODIES_JSON``: print the result as JSON."""
    url, concurrency, duration_s, warmup_s, bodies_path = argv
    bodies = [body.encode() for body in json.loads(Path(bodies_path).read_text())]
    result = asyncio.run(
        closed_loop(url, bodies, int(concurrency), float(duration_s), float(warmup_s))
    )
    print(json.dumps(result))


def load(url: str, bodies_path: Path, concurrency: int, duration_s: float) -> dict[str, Any]:
    """Run the client in a fresh process (its own interpreter and GIL) against ``url``."""
    warmup_s = 1.0
    output = subprocess.run(
        [
            *(sys.executable, __file__, "client", url),
            *(str(concurrency), str(duration_s), str(warmup_s), str(bodies_path)),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration_s + warmup_s + 180,
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


# --- processes ---------------------------------------------------------------------------------


def first_200(url: str, body: bytes, started: float, timeout_s: float = 300.0) -> float:
    """Seconds from ``started`` (a ``time.monotonic()``) to the first 200 from ``POST url``."""
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.post(
                url, content=body, headers={"content-type": "application/json"}, timeout=10
            )
            if response.status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")


# --- the benchmark -----------------------------------------------------------------------------


def demo_records(count: int, seed: int) -> list[dict[str, Any]]:
    """Demo loan applications as JSON records (every model input, no label, no identifier)."""
    from mlplatform.demo.data import generate_loans

    frame = generate_loans(count, seed=seed).drop(columns=["defaulted", "application_id"])
    frame = frame.astype(object)
    return json.loads(frame.where(frame.notna(), None).to_json(orient="records"))


def in_process_rows_per_s(model_uri: str, tracking_uri: str, records: list[dict]) -> list[float]:
    """Rows/s of the served model's own ``predict`` on ``records`` (parsed), several times.

    The call the endpoint makes, in this process: no HTTP, no JSON, no validation.
    """
    from mlplatform.serving.model import load_served_model

    model = load_served_model(model_uri, tracking_uri)
    model.predict(records)  # warm
    rates = []
    for _ in range(7):
        started = time.perf_counter()
        model.predict(records)
        rates.append(len(records) / (time.perf_counter() - started))
    return rates


def in_process_batch_us(
    tracking_uri: str, records: list[dict], batch: int = 8, batches: int = 2000
) -> dict[str, float]:
    """Microseconds to answer one micro-batch of single records, per release, in this process.

    What a replica does for a micro-batch of ``batch`` one-record requests
    (:func:`mlplatform.serving.routes.answer_singles`: the split by version, the model calls,
    the answers), without HTTP, recorders or metrics; in shadow, the challenger's scoring of the
    same records on the shadow thread is waited for and counted too. Median of 3 runs.
    """
    from mlplatform.serving.model import load_served_model
    from mlplatform.serving.routes import answer_singles
    from mlplatform.serving.served import ReleaseMember, ServedRelease, ShadowScorer, SingleRequest

    models = {v: load_served_model(f"models:/mlplatform/{v}", tracking_uri) for v in ("1", "2")}
    timings: dict[str, float] = {}
    for name, release in releases().items():
        challenger = None
        if release.challenger is not None and release.stage is not None:
            challenger = ReleaseMember(models[release.challenger], release.stage)
        served = ServedRelease(
            release, ReleaseMember(models[release.champion], "champion"), challenger
        )
        shadow = ShadowScorer(max_queued=batches)
        requests = [
            [
                SingleRequest(records[(i * batch + j) % len(records)], f"r{i}-{j}", f"k{i}-{j}")
                for j in range(batch)
            ]
            for i in range(batches)
        ]
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            for group in requests:
                answer_singles(served, group, shadow)
            shadow.wait_idle(timeout_s=120)
            runs.append((time.perf_counter() - started) / batches * 1e6)
        timings[name] = statistics.median(runs)
    return timings


def deploy_app(
    head: "LocalHead",
    serve_port: int,
    tracking_uri: str,
    app_name: str,
    release: "Release",
    traffic_profiling: bool = True,
) -> None:
    """The default deployment's settings serving ``release``, as app ``app_name``.

    The app answers under ``/<app_name>`` beside the platform's own endpoint, on the same head.
    """
    from mlplatform.defs.serving import EndpointConfig
    from mlplatform.serving import cluster
    from mlplatform.settings import load_settings

    settings = EndpointConfig(traffic_profiling=traffic_profiling).serving_settings(
        load_settings().model_name, tracking_uri
    )
    cluster.deploy(
        settings,
        release=release,
        ray_address=None,
        host=LOOPBACK,
        port=serve_port,
        app_name=app_name,
        local_head=head,
        route_prefix=f"/{app_name}",
    )


def endpoint_deploy_seconds(dagster_home: Path) -> float:
    """How long the run's ``model_endpoint`` took from deploy to serving (its metadata).

    The first deployment on a fresh head: Serve's controller and HAProxy start, the replica and
    its recorder process start and load the model, until ``/healthz`` names the new version.
    """
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("model_endpoint"))
    return float(event.asset_materialization.metadata["deploy_seconds"].value)


@dataclasses.dataclass
class Platform:
    """The platform the benchmark started: its home, Ray head, environment and endpoint."""

    home: Path
    head: "LocalHead"
    env: dict[str, str]
    serve_port: int
    tracking_uri: str
    startup_s: dict[str, float]

    @property
    def url(self) -> str:
        """The endpoint's base URL."""
        return f"http://{LOOPBACK}:{self.serve_port}"


def start_platform(home: Path, processes: list[subprocess.Popen]) -> Platform:
    """A Ray head on free ports, then ``python -m mlplatform run`` in the platform home ``home``.

    The head is started here in the foreground (added to ``processes``, so it stops by pid) with
    the environment the platform gives its own head, so the endpoint is the default deployment.
    """
    ray_port, serve_port = free_port(), free_port()
    os.environ.update(
        {
            "MLPLATFORM_HOME": str(home),
            "DAGSTER_HOME": str(home / "dagster"),
            "MLPLATFORM_RAY_PORT": str(ray_port),
            "MLPLATFORM_SERVE_PORT": str(serve_port),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
    )
    os.environ.pop("RAY_ADDRESS", None)
    (home / "dagster").mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster" / "dagster.yaml")
    from mlplatform.serving.cluster import LocalHead
    from mlplatform.settings import load_settings

    head = LocalHead(ray_port, load_settings().ray_dir)
    env = head.environment()  # what `LocalHead.ensure_running` gives the platform's own head
    stack = Platform(home, head, env, serve_port, f"sqlite:///{home / 'mlflow' / 'mlflow.db'}", {})
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        f"--node-ip-address={LOOPBACK}", f"--port={ray_port}", "--include-dashboard=false",
        "--disable-usage-stats",
    ]  # fmt: skip
    started = time.monotonic()
    processes.append(start(command, env, home / "ray.log"))
    wait_for_port(ray_port, 120)
    stack.startup_s["ray_head"] = time.monotonic() - started
    started = time.monotonic()
    run_platform(stack)
    stack.startup_s["mlplatform_run"] = time.monotonic() - started
    stack.startup_s["ours_first_deploy"] = endpoint_deploy_seconds(home / "dagster")
    print(f"`python -m mlplatform run`: {stack.startup_s['mlplatform_run']:.0f} s")
    return stack


def run_platform(stack: Platform) -> None:
    """``python -m mlplatform run`` (train, register, evaluate, deploy), its output to run.log."""
    with (stack.home / "run.log").open("a") as log:
        subprocess.run(
            [sys.executable, "-m", "mlplatform", "run"],
            env=stack.env,
            cwd=REPO,
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_platform(processes: list[subprocess.Popen], stack: Platform | None) -> None:
    """Stop every process started (by pid), then check that HAProxy went with the head."""
    for process in reversed(processes):
        stop(process, timeout_s=60.0)
    if stack is None:
        return
    with socket.socket() as sock:
        sock.settimeout(0.5)
        if sock.connect_ex((LOOPBACK, stack.serve_port)) == 0:
            print(f"something still listens on {stack.url} after the head stopped")


def summary(runs: list[dict[str, Any]], key: str) -> tuple[float, float, float]:
    """Median, min and max of ``key`` over rounds."""
    values = [run[key] for run in runs]
    return statistics.median(values), min(values), max(values)


def failures(runs: list[dict[str, Any]]) -> int:
    """Non-200 answers and client errors over the runs."""
    return sum(sum(run["failures"].values()) for run in runs)


def main() -> int:
    """Run the benchmark; exit status 0 when the endpoint answered without a single error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting")
    parser.add_argument("--keep", action="store_true", help="keep the temporary platform home")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument(
        "--release-cost",
        action="store_true",
        help="instead: a one-model release vs a two-model canary vs shadow, side by side",
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="clients of the --release-cost run (16)"
    )
    args = parser.parse_args()

    if args.release_cost:
        return release_cost(args)
    home = Path(tempfile.mkdtemp(prefix="mlplatform-serving-bench-"))
    baseline_port = free_port()
    baseline = f"http://{LOOPBACK}:{baseline_port}"
    load_before = os.getloadavg()
    processes: list[subprocess.Popen] = []
    results: dict[str, Any] = {}
    stack: Platform | None = None

    singles = demo_records(512, seed=5)
    bodies = home / "single.json"
    bodies.write_text(json.dumps([json.dumps({"records": [r]}) for r in singles]))
    batch_records = demo_records(BATCH_ROWS, seed=6)
    batch_bodies = home / "batch.json"
    batch_bodies.write_text(json.dumps([json.dumps({"records": batch_records})]))
    probe = json.dumps({"records": singles[:1]}).encode()
    try:
        stack = start_platform(home, processes)
        head, env, serve_port = stack.head, stack.env, stack.serve_port
        tracking_uri, ours, results["startup_s"] = stack.tracking_uri, stack.url, stack.startup_s
        print(f"platform home {home}; endpoint {ours}; baseline {baseline}")
        started = time.monotonic()
        processes.append(
            start(
                [
                    *(sys.executable, str(REPO / "benchmarks" / "baseline_server.py")),
                    *("--tracking-uri", tracking_uri, "--port", str(baseline_port)),
                ],
                env,
                home / "baseline.log",
            )
        )
        results["startup_s"]["baseline"] = first_200(f"{baseline}/predict", probe, started)
        started = time.monotonic()
        from mlplatform.serving.release import Release

        champion = httpx.get(f"{ours}/healthz", timeout=10).json()["model_version"]
        deploy_app(head, serve_port, tracking_uri, "noprofile", Release(champion=champion), False)
        results["startup_s"]["ours_new_app"] = first_200(
            f"{ours}/noprofile/predict", probe, started
        )
        print(
            "first 200: baseline {baseline:.1f} s from process start; ours {ours_new_app:.1f} s "
            "for a new deployment on the running head".format(**results["startup_s"])
        )

        runs: dict[tuple[str, int], list[dict[str, Any]]] = collections.defaultdict(list)
        servers = {"ours": f"{ours}/predict", "baseline": f"{baseline}/predict"}
        for round_ in range(args.rounds):
            for concurrency in CONCURRENCIES:
                order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
                for name in order:
                    run = load(servers[name], bodies, concurrency, args.duration_s)
                    runs[(name, concurrency)].append(run)
                    print(
                        f"round {round_ + 1} c={concurrency:<2} {name:8} "
                        f"{run['requests_per_s']:7.0f} req/s  p50 {run['p50_ms']:6.1f} ms  "
                        f"p99 {run['p99_ms']:6.1f} ms  failures {run['failures'] or 0}"
                    )
            for name in servers if round_ % 2 else reversed(servers):
                run = load(servers[name], batch_bodies, 1, args.duration_s)
                run["rows_per_s"] = run["requests_per_s"] * BATCH_ROWS
                runs[(name, BATCH_ROWS)].append(run)
                rate = run["rows_per_s"]
                print(f"round {round_ + 1} {BATCH_ROWS} rows {name:8} {rate:9.0f} rows/s")
            profiling = [("profiled", ours), ("unprofiled", f"{ours}/noprofile")]
            for name, url in profiling if round_ % 2 == 0 else reversed(profiling):
                time.sleep(2)  # let the profiler finish the previous run's records
                run = load(f"{url}/predict", bodies, 32, args.duration_s)
                runs[(name, 32)].append(run)
                print(f"round {round_ + 1} c=32 {name:10} {run['requests_per_s']:7.0f} req/s")
            for name, url in profiling if round_ % 2 else reversed(profiling):
                time.sleep(2)
                run = load(f"{url}/predict", batch_bodies, 1, args.duration_s)
                run["rows_per_s"] = run["requests_per_s"] * BATCH_ROWS
                runs[(name, BATCH_ROWS)].append(run)
                rate = run["rows_per_s"]
                print(f"round {round_ + 1} {BATCH_ROWS} rows {name:10} {rate:9.0f} rows/s")
        in_process = in_process_rows_per_s(
            "models:/mlplatform@champion", tracking_uri, batch_records
        )
        results["in_process_rows_per_s"] = statistics.median(in_process)
        results["runs"] = {f"{name}@{c}": value for (name, c), value in runs.items()}
    finally:
        stop_platform(processes, stack)
    results["load_average"] = (load_before, os.getloadavg())
    figures = report(results, args)
    print("\n".join(figures))
    if not args.no_record:
        RESULTS.open("a").write("\n".join(["", *figures, ""]))
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    ours_failures = sum(
        failures(value) for key, value in results["runs"].items() if not key.startswith("baseline")
    )
    return 0 if ours_failures == 0 else 1


def report(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The Markdown section for RESULTS.md."""
    runs = {tuple(key.split("@")): value for key, value in results["runs"].items()}

    def cell(name: str, c: int, key: str, digits: int = 0) -> str:
        median, low, high = summary(runs[(name, str(c))], key)
        return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"

    def median(name: str, c: int, key: str) -> float:
        return summary(runs[(name, str(c))], key)[0]

    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("ray", "fastapi", "uvicorn", "lightgbm", "scikit-learn", "aiohttp")
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    before, after = results["load_average"]
    startup = results["startup_s"]
    lines = [
        f"### Serving: endpoint vs plain FastAPI ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {versions}. "
        f"Load average {before[0]:.1f} before, {after[0]:.1f} after (other jobs share the "
        f"machine). {args.rounds} alternating rounds of {args.duration_s:g} s per setting "
        "(closed-loop aiohttp client in its own process, 1 s warm-up); median (min-max). "
        "Ours: the default deployment of `python -m mlplatform run` (HAProxy + direct ingress, "
        "EndpointConfig defaults, traffic profiling on). Baseline: benchmarks/baseline_server.py "
        "(FastAPI + uvicorn, 1 worker, same model, validation and micro-batching).",
        "",
        "| single records | ours req/s | baseline req/s | ratio | ours p50 / p99 ms "
        "| baseline p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for c in CONCURRENCIES:
        ratio = median("ours", c, "requests_per_s") / median("baseline", c, "requests_per_s")
        lines.append(
            f"| concurrency {c} | {cell('ours', c, 'requests_per_s')} "
            f"| {cell('baseline', c, 'requests_per_s')} | {ratio:.2f}x "
            f"| {median('ours', c, 'p50_ms'):.1f} / {cell('ours', c, 'p99_ms', 1)} "
            f"| {median('baseline', c, 'p50_ms'):.1f} / {cell('baseline', c, 'p99_ms', 1)} |"
        )
    in_process = results["in_process_rows_per_s"]
    ours_rows = median("ours", BATCH_ROWS, "rows_per_s")
    baseline_rows = median("baseline", BATCH_ROWS, "rows_per_s")
    profiled = median("profiled", 32, "requests_per_s")
    unprofiled = median("unprofiled", 32, "requests_per_s")
    cost = 1 - profiled / unprofiled
    bulk_cost = 1 - median("profiled", BATCH_ROWS, "rows_per_s") / median(
        "unprofiled", BATCH_ROWS, "rows_per_s"
    )
    ratio_32 = median("ours", 32, "requests_per_s") / median("baseline", 32, "requests_per_s")
    ours_failures = sum(failures(v) for k, v in runs.items() if k[0] != "baseline")
    baseline_failures = sum(failures(v) for k, v in runs.items() if k[0] == "baseline")
    p99_32, p50_1 = median("ours", 32, "p99_ms"), median("ours", 1, "p50_ms")

    def verdict(met: bool) -> str:
        return "met" if met else "**not met**"

    lines += [
        "",
        f"{BATCH_ROWS}-record requests (concurrency 1): ours "
        f"{cell('ours', BATCH_ROWS, 'rows_per_s')} rows/s ({ours_rows / in_process:.0%} of "
        "in-process), baseline "
        f"{cell('baseline', BATCH_ROWS, 'rows_per_s')} rows/s ({baseline_rows / in_process:.0%}); "
        f"the model's in-process `predict` of the same rows: {in_process:.0f} rows/s.",
        f"Traffic profiling, single records at concurrency 32: on "
        f"{cell('profiled', 32, 'requests_per_s')} req/s, off "
        f"{cell('unprofiled', 32, 'requests_per_s')} req/s ({cost:.1%} cost); {BATCH_ROWS}-record "
        f"requests at concurrency 1: on {cell('profiled', BATCH_ROWS, 'rows_per_s')} rows/s, off "
        f"{cell('unprofiled', BATCH_ROWS, 'rows_per_s')} rows/s ({bulk_cost:.1%} cost).",
        f"Startup: baseline {startup['baseline']:.1f} s from process start to the first 200; "
        f"ours {startup['ours_first_deploy']:.1f} s for the platform's first deployment on a "
        f"fresh head (Serve, HAProxy, the replica and its recorder process; to `/healthz` naming "
        f"the version) and {startup['ours_new_app']:.1f} s from deploying a second app (no "
        f"profiling) to its first 200. The head itself starts in {startup['ray_head']:.1f} s; "
        f"`python -m mlplatform run`, training included, took {startup['mlplatform_run']:.0f} s.",
        f"Errors (non-200 or client errors): ours {ours_failures}, baseline {baseline_failures}.",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        f"| c=32 req/s >= {TARGETS['ratio_32']:.1f}x baseline | {ratio_32:.2f}x "
        f"| {verdict(ratio_32 >= TARGETS['ratio_32'])} |",
        f"| c=32 p99 <= {TARGETS['p99_32_ms']:.0f} ms | {p99_32:.1f} ms "
        f"| {verdict(p99_32 <= TARGETS['p99_32_ms'])} |",
        f"| zero errors | {ours_failures} | {verdict(ours_failures == 0)} |",
        f"| c=1 p50 <= {TARGETS['p50_1_ms']:.0f} ms | {p50_1:.1f} ms "
        f"| {verdict(p50_1 <= TARGETS['p50_1_ms'])} |",
        f"| {BATCH_ROWS}-record rows/s >= {TARGETS['rows_share']:.0%} of in-process "
        f"| {ours_rows / in_process:.0%} "
        f"| {verdict(ours_rows / in_process >= TARGETS['rows_share'])} |",
        f"| profiling cost <= {TARGETS['profiling_cost']:.0%} (single records, c=32) "
        f"| {cost:.1%} | {verdict(cost <= TARGETS['profiling_cost'])} |",
        f"| profiling cost <= {TARGETS['profiling_cost']:.0%} ({BATCH_ROWS}-record requests) "
        f"| {bulk_cost:.1%} | {verdict(bulk_cost <= TARGETS['profiling_cost'])} |",
    ]
    return lines


def releases() -> dict[str, "Release"]:
    """The three releases compared: v1 alone, v2 in canary beside it, v2 in shadow beside it."""
    from mlplatform.serving.release import Release

    return {
        "one model": Release(champion="1"),
        "canary": Release(
            champion="1",
            challenger="2",
            stage="canary",
            canary_share=CANARY_SHARE,
            rollout_id="benchmark-canary",
        ),
        "shadow": Release(
            champion="1", challenger="2", stage="shadow", rollout_id="benchmark-shadow"
        ),
    }


def release_cost(args: argparse.Namespace) -> int:
    """Single-record throughput of a one-model release, a canary and a shadow, side by side."""
    home = Path(tempfile.mkdtemp(prefix="mlplatform-release-bench-"))
    processes: list[subprocess.Popen] = []
    stack: Platform | None = None
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    bodies = home / "single.json"
    bodies.write_text(json.dumps([json.dumps({"records": [r]}) for r in demo_records(512, seed=5)]))
    try:
        stack = start_platform(home, processes)
        run_platform(stack)  # v2, the challenger of the canary and the shadow
        apps = {name: name.replace(" ", "-") for name in releases()}
        for name, release in releases().items():
            deploy_app(stack.head, stack.serve_port, stack.tracking_uri, apps[name], release)
        print(f"platform home {home}; apps {', '.join(f'/{app}' for app in apps.values())}")
        for round_ in range(args.rounds):
            names = list(apps)
            names = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in names:
                time.sleep(2)  # let the recorder and the shadow finish the previous run's work
                url = f"{stack.url}/{apps[name]}/predict"
                run = load(url, bodies, args.concurrency, args.duration_s)
                runs[name].append(run)
                print(
                    f"round {round_ + 1} {name:9} {run['requests_per_s']:7.0f} req/s  "
                    f"p50 {run['p50_ms']:6.1f} ms  p99 {run['p99_ms']:6.1f} ms  "
                    f"failures {run['failures'] or 0}"
                )
        load_after = os.getloadavg()
        batch_us = in_process_batch_us(stack.tracking_uri, demo_records(512, seed=5))
    finally:
        _leave_ray()
        stop_platform(processes, stack)
    figures = release_report(dict(runs), batch_us, args, (load_before, load_after))
    print("\n".join(figures))
    if not args.no_record:
        with RESULTS.open("a") as handle:
            handle.write("\n".join(["", *figures, ""]))
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return 0 if sum(failures(value) for value in runs.values()) == 0 else 1


def _leave_ray() -> None:
    """Disconnect from the head this process deployed to, before it stops."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def release_report(
    runs: dict[str, list[dict[str, Any]]],
    batch_us: dict[str, float],
    args: argparse.Namespace,
    load_average: tuple[tuple[float, ...], tuple[float, ...]],
) -> list[str]:
    """The Markdown section for RESULTS.md: each release's figures and its ratio to one model."""
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("ray", "lightgbm"))
    before, after = load_average
    one = summary(runs["one model"], "requests_per_s")[0]
    lines = [
        f"### Serving: the cost of a rollout ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, {versions}. Load "
        f"average {before[0]:.1f} before, {after[0]:.1f} after. Single-record requests from "
        f"{args.concurrency} closed-loop clients (aiohttp, its own process, 1 s warm-up), "
        f"{args.rounds} rounds of {args.duration_s:g} s per release, the three alternating; "
        "median (min-max). Each release is an app of the default deployment (1 replica, "
        f"traffic profiling and the prediction log on); canary: v2 answers {CANARY_SHARE:.0%} "
        "of the requests; shadow: v2 scores every request after the answer left.",
        "",
        "The last column is measured in this process after the rounds (see "
        "``in_process_batch_us``): the time to answer a micro-batch of 8 single records, "
        "split by version, model calls and answers, no HTTP or recorders.",
        "",
        "| release | req/s | share of one model | target | p50 / p99 ms | errors "
        "| micro-batch of 8, in process |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, values in runs.items():
        rate, low, high = summary(values, "requests_per_s")
        target = RELEASE_TARGETS.get(name)
        verdict = (
            ""
            if target is None
            else f">= {target:.0%}: {'met' if rate / one >= target else '**not met**'}"
        )
        lines.append(
            f"| {name} | {rate:.0f} ({low:.0f}-{high:.0f}) | {rate / one:.0%} | {verdict} "
            f"| {summary(values, 'p50_ms')[0]:.1f} / {summary(values, 'p99_ms')[0]:.1f} "
            f"| {failures(values)} | {batch_us[name]:.0f} us |"
        )
    return lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        client_main(sys.argv[2:])
    else:
        sys.exit(main())
