"""The self-healing loop with the real Dagster daemon, timed from drift onset to the new model.

Starts everything on loopback in a temporary platform home (a Ray head, the first training run
and endpoint, the Dagster daemon with its sensors), sends normal traffic, then drifted traffic
while the demo source moves to the drifted population, and waits until the drift sensor's
retrain serves a new model version. Prints the timeline and appends it to benchmarks/RESULTS.md.
Every process it starts is stopped by pid at the end.

    python benchmarks/drift_loop.py [--normal-s 75] [--rate 20] [--timeout-s 900]
"""

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import httpx
from processes import LOOPBACK, REPO, free_port, start, start_ray_head, stop

RESULTS = REPO / "benchmarks" / "RESULTS.md"


def served_version(url: str) -> str | None:
    """The model version the endpoint serves, or None when it does not answer."""
    try:
        return httpx.get(f"{url}/healthz", timeout=5).json()["model_version"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def traffic(url: str, rate: float, drift: float, stop_event: threading.Event) -> None:
    """Send demo traffic in 5-second bursts until ``stop_event`` is set."""
    from mlplatform.demo.simulate import simulate

    seed = 100
    while not stop_event.is_set():
        simulate(url, rate=rate, duration_s=5, drift=drift, seed=seed)
        seed += 1


def retrain_runs(dagster_home: Path) -> list:
    """Runs of retrain_job the drift sensor requested, oldest first."""
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        records = instance.get_run_records(
            dg.RunsFilter(job_name="retrain_job", tags={"mlplatform/trigger": "drift"})
        )
    return sorted(records, key=lambda record: record.create_timestamp)


def main() -> int:
    """Run the demo; exit status 0 when a new model served after the drift."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--normal-s", type=float, default=75.0, help="normal traffic first (s)")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--drift", type=float, default=0.9, help="drift of the new population")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="give up after (s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary platform home")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mlplatform-drift-loop-"))
    ray_port, serve_port = free_port(), free_port()
    env = os.environ | {
        "MLPLATFORM_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "MLPLATFORM_RAY_PORT": str(ray_port),
        "MLPLATFORM_SERVE_PORT": str(serve_port),
        "MLPLATFORM_DRIFT_INTERVAL_S": "15",
        "MLPLATFORM_DRIFT_LOOKBACK_MIN": "2",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    env.pop("RAY_ADDRESS", None)
    (home / "dagster").mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster" / "dagster.yaml")
    os.environ.update(env)
    url = f"http://{LOOPBACK}:{serve_port}"
    bin_dir = Path(sys.executable).parent
    processes: list[subprocess.Popen] = []
    timeline: dict[str, float] = {}
    try:
        # The head the platform would start itself, but in the foreground so it stops by pid.
        processes.append(start_ray_head(ray_port, env, home / "ray.log"))
        print(f"platform home {home}; endpoint {url}")
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "mlplatform", "run"], env=env, cwd=REPO, check=True)
        print(f"first model serving after {time.monotonic() - started:.0f} s")
        processes.append(
            start(
                [str(bin_dir / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                env,
                home / "daemon.log",
            )
        )
        first = served_version(url)
        stop_traffic = threading.Event()
        sender = threading.Thread(target=traffic, args=(url, args.rate, 0.0, stop_traffic))
        sender.start()
        print(f"normal traffic for {args.normal_s:.0f} s ...")
        time.sleep(args.normal_s)
        stop_traffic.set()
        sender.join()

        from mlplatform.demo.simulate import move_demo_source

        move_demo_source(home / "data" / "demo" / "loans.csv", args.drift)
        timeline["onset"] = time.time()
        print(f"drift onset (drift {args.drift}): traffic and the demo source move")
        stop_traffic = threading.Event()
        sender = threading.Thread(target=traffic, args=(url, args.rate, args.drift, stop_traffic))
        sender.start()
        deadline = time.monotonic() + args.timeout_s
        while time.monotonic() < deadline:
            version = served_version(url)
            if version is not None and version != first:
                timeline["serving"] = time.time()
                break
            time.sleep(1)
        stop_traffic.set()
        sender.join()
    finally:
        for process in reversed(processes):
            stop(process)
    if "serving" not in timeline:
        print(f"no new model within {args.timeout_s:.0f} s; logs under {home}")
        return 1
    runs = retrain_runs(home / "dagster")
    run = runs[0]
    timeline["requested"] = run.create_timestamp.timestamp()
    timeline["run_started"] = run.start_time or timeline["requested"]
    timeline["run_ended"] = run.end_time or timeline["serving"]
    onset = timeline["onset"]
    figures = {
        "sensor requested a retrain": timeline["requested"] - onset,
        "retrain run started": timeline["run_started"] - onset,
        "retrain run ended": timeline["run_ended"] - onset,
        "new model serving": timeline["serving"] - onset,
    }
    for label, seconds in figures.items():
        print(f"{label}: {seconds:.0f} s after drift onset")
    record(figures, args, run.dagster_run.run_id, first)
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return 0


def record(
    figures: dict[str, float], args: argparse.Namespace, run_id: str, first: str | None
) -> None:
    """Append the timeline to benchmarks/RESULTS.md."""
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("dagster", "ray", "mlflow", "whylogs")
    )
    lines = [
        "",
        f"### Drift loop with the daemon ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, {versions}. "
        f"Traffic {args.rate:g} req/s, {args.normal_s:.0f} s normal then drift {args.drift}; "
        "traffic windows 60 s, drift sensor every 15 s, lookback 2 min. "
        f"Retrain run {run_id}, replacing v{first}.",
        "",
        "| event | seconds after drift onset |",
        "|---|---|",
        *(f"| {label} | {seconds:.0f} |" for label, seconds in figures.items()),
        "",
    ]
    with RESULTS.open("a") as handle:
        handle.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
