"""The full asset graph under Dagster's run machinery vs its functions called directly.

For each size, a CSV of ``generate_loans(n)`` is written into a fresh temporary platform home and
two runs are timed, each in its own process with its own fresh Ray head (started here in the
foreground, stopped by pid):

- **dagster**: ``dagster asset materialize -m mlplatform.definitions --select '*'`` (every asset
  and its checks: ingest, features, reference profile, training with the default tuning budget,
  evaluation, promotion, Ray Serve deployment with its smoke test, drift report);
- **plain**: ``benchmarks/plain_pipeline.py``: the same assets' own functions, invoked directly
  (``dg.build_asset_context()``, ``defs``' resources, default configs) in the graph's order, each
  output handed to the next in memory. Same code, same metadata, same checks; what it leaves out
  is Dagster's run machinery: the CLI and its process start-up, run and event storage, the IO
  manager (pickling every output to disk and back), the executor and its step bookkeeping.

So "Dagster's share" below is the cost of that machinery, not of Dagster as a library: both runs
import Dagster and the definitions, and both pay for the assets' Dagster metadata.

Dagster runs the default tuning budget (10 trials or 60 s); the plain script then runs exactly
as many trials as Dagster completed (the seeded search tries the same parameters), so both
train the same models. It reports each process's wall time, CPU time and peak memory (the
driver process only; Ray's processes are not counted), the wall and CPU time per asset (from
Dagster's event log, and within each step the time the IO manager spends storing and loading
outputs; from the plain script's own windows) and Dagster's share: the difference of the wall
totals, of the CPU totals, and the Dagster-only time (extra start-up, IO manager, gaps between
steps, extra exit time). Other jobs on the machine inflate wall times but hardly CPU times,
hence both. Then the CLI end to end on the default demo data (a fresh home, no
MLPLATFORM_SOURCE). Appends everything to benchmarks/RESULTS.md.

    python benchmarks/pipeline.py [--sizes 10000,100000,1000000] [--no-cli] [--no-record]
                                  [--timeout-s 1800] [--py-spy DIR] [--keep]

Runtime on two (shared) cores: ``--sizes 10000 --no-cli`` about 3.5 minutes, ``--sizes 10000``
(with the CLI run) about 6 minutes; the 100k and 1M sizes take longer (each run's Ray head can
take up to 30 s more to drain). ``--py-spy DIR`` records every run with py-spy (raw collapsed
stacks, 20 Hz) into DIR and prints where the Dagster run's samples fall; the process measured is
then py-spy, so CPU by step is not reported and timings include the profiler's overhead.
"""

import argparse
import bisect
import collections
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

from processes import REPO, free_port, start, start_ray_head, stop

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SHARE_TARGET = 0.10  # Dagster's share of the wall time at 1M rows
CLI_TARGET_S = 60.0


def new_home(root: Path, name: str, csv: Path | None) -> tuple[Path, dict[str, str]]:
    """A fresh platform home (with the CSV copied in) and the environment of a run on it."""
    home = root / name
    (home / "dagster").mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster" / "dagster.yaml")
    from mlplatform.serving.cluster import LocalHead
    from mlplatform.settings import load_settings

    # The environment the platform starts its own local head with (loopback, token auth, the
    # serving path's settings), so the head started here is the one `make run` would start.
    ray_port = free_port()
    head = LocalHead(ray_port, load_settings({"MLPLATFORM_HOME": str(home)}).ray_dir)
    env = head.environment() | {
        "MLPLATFORM_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "MLPLATFORM_RAY_PORT": str(ray_port),
        "MLPLATFORM_SERVE_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLPLATFORM_SOURCE", "MLPLATFORM_TARGET"):
        env.pop(name, None)
    if csv is not None:
        (home / "data").mkdir()
        source = shutil.copy(csv, home / "data" / "loans.csv")
        env |= {"MLPLATFORM_SOURCE": str(source), "MLPLATFORM_TARGET": "defaulted"}
    return home, env


class CpuSampler(threading.Thread):
    """Samples a process's cumulative CPU time (user + system, from /proc) a few times a second.

    With the event log's (or the plain script's) step start and end times, this gives each
    step's CPU seconds: unlike wall time, they hardly change when other jobs load the machine.
    """

    def __init__(self, pid: int, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/stat")
        self.interval_s = interval_s
        self.status = Path(f"/proc/{pid}/status")
        self.samples: list[tuple[float, float]] = []
        self.peak_rss_mib = 0.0
        self.done = threading.Event()
        self.ticks = os.sysconf("SC_CLK_TCK")

    def read(self) -> float | None:
        """The process's CPU seconds so far (its own and its reaped children's)."""
        try:
            fields = self.path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return sum(int(value) for value in fields[11:15]) / self.ticks

    def read_peak_rss(self) -> None:
        """The process's peak resident memory so far (VmHWM), in MiB.

        Not ``ru_maxrss``: a child inherits its parent's peak through fork and exec, so this
        benchmark's own memory (the CSV it generates) would show in every run it starts.
        """
        try:
            for line in self.status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_mib = max(self.peak_rss_mib, int(line.split()[1]) / 1024)
        except OSError:
            pass

    def run(self) -> None:
        """Sample until stopped or the process is gone."""
        while not self.done.is_set():
            cpu = self.read()
            if cpu is None:
                return
            self.read_peak_rss()
            self.samples.append((time.time(), cpu))
            self.done.wait(self.interval_s)

    def at(self, moment: float) -> float:
        """CPU seconds at ``moment`` (epoch s), interpolated between samples."""
        times = [t for t, _ in self.samples]
        index = bisect.bisect_left(times, moment)
        if index == 0:
            return self.samples[0][1] if self.samples else 0.0
        if index == len(times):
            return self.samples[-1][1]
        (t0, c0), (t1, c1) = self.samples[index - 1], self.samples[index]
        return c0 + (c1 - c0) * (moment - t0) / (t1 - t0)


def run_measured(
    command: list[str], env: dict[str, str], log: Path, timeout_s: float
) -> tuple[float, float, float, int, CpuSampler]:
    """Run a command to completion: ``(wall s, CPU s, peak RSS MiB, exit status, sampler)``.

    The process group is killed after ``timeout_s``. CPU time (user + system) is the process's
    own (and any child's it waited for), from ``os.wait4``; the peak RSS its VmHWM, sampled.
    """
    started = time.perf_counter()
    process = start(command, env, log)
    sampler = CpuSampler(process.pid)
    sampler.start()
    timer = threading.Timer(timeout_s, lambda: os.killpg(process.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
        sampler.done.set()
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    cpu = usage.ru_utime + usage.ru_stime
    sampler.join()
    sampler.samples.append((time.time(), cpu))
    return wall, cpu, sampler.peak_rss_mib, process.returncode, sampler


def dagster_timings(dagster_home: Path) -> dict[str, dict[str, float]]:
    """Per step of the (only) run in a Dagster instance, from its event log.

    Returns:
        asset -> ``start`` and ``end`` (epoch s) and ``io``: seconds loading inputs and storing
        outputs with the IO manager (up to each LOADED_INPUT / HANDLED_OUTPUT event from the
        step's previous event).

    """
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        records = instance.get_run_records()
        if len(records) != 1:
            raise RuntimeError(f"expected one run in {dagster_home}, found {len(records)}")
        run_id = records[0].dagster_run.run_id
        events = [e for e in instance.all_logs(run_id) if e.dagster_event is not None]
    steps: dict[str, dict[str, float]] = {}
    last: dict[str, float] = {}
    output: dict[str, float] = {}
    for entry in events:
        kind, step, stamp = entry.dagster_event.event_type, entry.step_key, entry.timestamp
        if step is None:
            continue
        if kind == dg.DagsterEventType.STEP_START:
            steps[step] = {"start": stamp, "end": stamp, "io": 0.0}
        elif kind in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            steps[step]["end"] = stamp
        elif kind == dg.DagsterEventType.STEP_OUTPUT:
            output[step] = stamp
        elif kind == dg.DagsterEventType.LOADED_INPUT:
            steps[step]["io"] += stamp - last.get(step, stamp)
        elif kind == dg.DagsterEventType.HANDLED_OUTPUT:
            # The output is pickled after it is yielded (STEP_OUTPUT) and before it is handled.
            steps[step]["io"] += stamp - output.get(step, stamp)
        last[step] = stamp
    return steps


def tuning_trials(home: Path) -> dict:
    """Tuning trials (nested MLflow runs) and the chosen algorithm in a home's MLflow store."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("mlplatform")
    if experiment is None:
        return {"trials": 0, "algorithm": "none"}
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    trials = [r for r in runs if r.info.run_name.startswith("lightgbm-trial-")]
    algorithms = [r.data.params["algorithm"] for r in runs if "algorithm" in r.data.params]
    return {"trials": len(trials), "algorithm": algorithms[0] if algorithms else "none"}


def measure(
    kind: str,
    label: str,
    csv: Path | None,
    root: Path,
    args: argparse.Namespace,
    trials: int | None = None,
) -> dict:
    """One run (``dagster`` or ``plain``) on a fresh home and a fresh Ray head.

    ``trials``: the plain script runs exactly this many tuning trials (no time budget).
    """
    home, env = new_home(root, f"{kind}-{label}", csv)
    if kind == "dagster":
        command = [
            str(Path(sys.executable).parent / "dagster"), "asset", "materialize",
            "-m", "mlplatform.definitions", "--select", "*",
        ]  # fmt: skip
    else:
        command = [
            sys.executable, str(REPO / "benchmarks" / "plain_pipeline.py"),
            "--json", str(home / "plain.json"),
        ]  # fmt: skip
        if trials:
            command += ["--tuning-trials", str(trials), "--tuning-timeout-s", "86400"]
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
        output = args.py_spy / f"{kind}-{label}.txt"
        command = [
            str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw",
            "--rate", "20", "--nonblocking", "-o", str(output), "--", *command,
        ]  # fmt: skip
    head = start_ray_head(int(env["MLPLATFORM_RAY_PORT"]), env, home / "ray.log")
    try:
        print(f"{kind} {label}: running ...", flush=True)
        launched, load = time.time(), os.getloadavg()[0]
        wall, cpu, rss, status, sampler = run_measured(
            command, env, home / f"{kind}.log", args.timeout_s
        )
        load = max(load, os.getloadavg()[0])
    finally:
        stop(head)
    result = {"kind": kind, "label": label, "wall": wall, "cpu": cpu, "rss_mib": rss}
    result["load"] = load
    result |= {"status": status, "launched": launched, "cpu_at": sampler.at}
    result |= tuning_trials(home)
    if status != 0:
        print(f"{kind} {label}: FAILED (exit {status}) after {wall:.0f} s; see {home}")
        return result
    if kind == "dagster":
        result["steps"] = dagster_timings(home / "dagster")
    else:
        plain = json.loads((home / "plain.json").read_text())
        result["steps"] = {
            name: {"start": start, "end": end} for name, (start, end) in plain["windows"].items()
        }
        result["order"] = plain["order"]
        result["facts"] = plain["facts"]
    if args.py_spy:  # the process measured was py-spy: CPU by step is not the pipeline's
        result["cpu_at"] = None
    print(
        f"{kind} {label}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {rss:.0f} MiB, "
        f"{result['trials']} tuning trials",
        flush=True,
    )
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return result


def phases(result: dict) -> dict[str, tuple[float, float | None]]:
    """``(wall s, CPU s)`` of every step and of the time around them.

    ``startup``: process start to the first step (imports, loading the definitions, the
    instance, the run and its resources); ``between``: gaps between steps; ``teardown``: after
    the last step. CPU is None when it was not sampled.
    """
    cpu_at = result["cpu_at"]

    def window(start: float, end: float) -> tuple[float, float | None]:
        return end - start, None if cpu_at is None else cpu_at(end) - cpu_at(start)

    steps = result["steps"]
    first = min(step["start"] for step in steps.values())
    last = max(step["end"] for step in steps.values())
    end = result["launched"] + result["wall"]
    out = {name: window(step["start"], step["end"]) for name, step in steps.items()}
    out["startup"] = window(result["launched"], first)
    out["teardown"] = window(last, end)
    inside = window(first, last)
    out["between"] = (
        inside[0] - sum(out[name][0] for name in steps),
        None if inside[1] is None else inside[1] - sum(out[name][1] for name in steps),
    )
    out["total"] = (result["wall"], result["cpu"])
    return out


def comparison_table(label: str, dagster: dict, plain: dict) -> list[str]:
    """Wall and CPU seconds per asset under Dagster and in the plain script, and around them."""
    d, p = phases(dagster), phases(plain)
    lines = [
        f"| {label} | dagster wall s | (IO manager s) | plain wall s | difference | "
        "dagster CPU s | plain CPU s | difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "startup": "start-up: imports, definitions, resources (dagster: + CLI, instance, run)",
        **{name: name for name in asset_names(dagster, plain)},
        "between": "between steps",
        "teardown": "after the last step",
        "total": "**process**",
    }
    for key, name in names.items():
        (dw, dc), (pw, pc) = d.get(key, (None, None)), p.get(key, (None, None))
        io = dagster["steps"].get(key, {}).get("io")
        lines.append(
            f"| {name} | {_s(dw)} | {_s(io)} | {_s(pw)} | {_diff(dw, pw)} | {_s(dc)} | {_s(pc)} "
            f"| {_diff(dc, pc)} |"
        )
    return lines


def asset_names(dagster: dict, plain: dict) -> list[str]:
    """The assets of both runs: the plain script's order (the graph's), then any other step."""
    steps = sorted(dagster.get("steps", {}).items(), key=lambda item: item[1]["start"])
    names = list(plain.get("order", []))
    return names + [name for name, _ in steps if name not in names]


def _diff(first: float | None, second: float | None) -> str:
    return "n/a" if first is None or second is None else f"{first - second:+.1f}"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def share(dagster: dict, plain: dict, measure: str = "wall") -> float:
    """Dagster's share of its wall (or CPU) time: what the plain script does not spend."""
    return (dagster[measure] - plain[measure]) / dagster[measure]


def attributed(dagster: dict, plain: dict) -> float:
    """Wall seconds only Dagster spends, from the parts that are Dagster's by construction.

    The extra start-up (Dagster's CLI, the instance and the run, over the plain script's
    imports, definitions and resource set-up), the IO manager storing and loading every output, the
    gaps between steps and the extra time after the last step. Unlike the difference of the
    totals, this excludes the noise of the long compute steps (training under a time budget,
    other jobs on the machine), but also misses work inside the steps (metadata, events).
    """
    d, p = phases(dagster), phases(plain)
    io = sum(step["io"] for step in dagster["steps"].values())
    return (
        d["startup"][0]
        - p["startup"][0]
        + io
        + d["between"][0]
        + d["teardown"][0]
        - p["teardown"][0]
    )


def summarize_py_spy(path: Path, assets: list[str], top: int = 12) -> list[str]:
    """Where a run's py-spy samples fall: per asset (innermost asset frame), and the rest.

    Raw py-spy output is one line per distinct stack: ``frame;frame;... count``, each frame
    ``function (file:line)``.
    """
    by_asset: collections.Counter = collections.Counter()
    outside: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        asset = next(
            (
                f.split(" ")[0]
                for f in frames
                if "mlplatform/defs/" in f and f.split(" ")[0] in assets
            ),
            None,
        )
        if asset is not None:
            by_asset[asset] += samples
        else:
            outside[_leaf_module(frames)] += samples
    lines = [f"{path.name}: {total} samples"]
    for asset, samples in by_asset.most_common():
        lines.append(f"  in {asset}: {samples / total:.1%}")
    lines.append(f"  outside any asset body: {sum(outside.values()) / max(total, 1):.1%}")
    for module, samples in outside.most_common(top):
        lines.append(f"    {module}: {samples / total:.1%}")
    return lines


def _leaf_module(frames: list[str]) -> str:
    """The top-level package of the outermost frame below the entry point that is not runpy."""
    for frame in frames[2:]:
        location = frame.partition("(")[2]
        if "site-packages/" in location:
            return location.split("site-packages/")[1].split("/")[0]
    return frames[-1] if frames else "?"


def main() -> int:
    """Run the benchmark; exit status 1 when a run failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="10000,100000,1000000", help="comma-separated row counts"
    )
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI run on the demo data")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per run")
    parser.add_argument("--py-spy", type=Path, help="record each run with py-spy into this dir")
    parser.add_argument("--keep", action="store_true", help="keep the temporary platform homes")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",") if size]
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="mlplatform-pipeline-bench-"))
    print(f"platform homes under {root}")

    results: list[tuple[str, dict, dict]] = []
    for n in sizes:
        csv = root / f"loans-{n}.csv"
        # In a child process, so this one stays small (its children inherit its peak memory).
        code = (
            "import sys; from mlplatform.demo.data import generate_loans; "
            "generate_loans(n_rows=int(sys.argv[1]), seed=7).to_csv(sys.argv[2], index=False)"
        )
        subprocess.run([sys.executable, "-c", code, str(n), str(csv)], check=True)
        label = f"{n:,} rows"
        dagster = measure("dagster", f"{n}", csv, root, args)
        plain = measure("plain", f"{n}", csv, root, args, trials=dagster["trials"])
        csv.unlink()
        results.append((label, dagster, plain))
    if not args.no_cli:
        dagster = measure("dagster", "demo", None, root, args)
        plain = measure("plain", "demo", None, root, args, trials=dagster["trials"])
        results.append(("CLI, demo data (5,000 rows)", dagster, plain))
    elapsed = time.monotonic() - started

    lines = report(results, args, elapsed)
    print("\n".join(lines))
    if args.py_spy:
        assets = {name for _, dagster, plain in results for name in asset_names(dagster, plain)}
        for path in sorted(args.py_spy.glob("dagster-*.txt")):
            print("\n".join(summarize_py_spy(path, sorted(assets))))
    if not args.no_record:
        with RESULTS.open("a") as handle:
            handle.write("\n".join(lines) + "\n")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(d["status"] == 0 and p["status"] == 0 for _, d, p in results) else 1


def report(results: list[tuple[str, dict, dict]], args: argparse.Namespace, elapsed: float):
    """The markdown section for RESULTS.md."""
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("dagster", "mlflow", "ray", "lightgbm", "scikit-learn", "whylogs")
    )
    summary = [
        "| data | wall s dagster / plain | Dagster's share of wall | CPU s dagster / plain | "
        "Dagster's share of CPU | peak RSS MiB dagster / plain | tuning trials dagster / plain "
        "| model dagster / plain | load average dagster / plain | Dagster-only time s (share) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, dagster, plain in results:
        ok = dagster["status"] == 0 and plain["status"] == 0
        summary.append(
            f"| {label} | {dagster['wall']:.1f} / {plain['wall']:.1f} | "
            + (f"{share(dagster, plain):.1%}" if ok else "failed")
            + f" | {dagster['cpu']:.1f} / {plain['cpu']:.1f} | "
            + (f"{share(dagster, plain, 'cpu'):.1%}" if ok else "failed")
            + f" | {dagster['rss_mib']:.0f} / {plain['rss_mib']:.0f} | "
            f"{dagster['trials']} / {plain['trials']} | "
            f"{dagster['algorithm']} / {plain['algorithm']} | "
            f"{dagster['load']:.1f} / {plain['load']:.1f} | "
            + (
                f"{attributed(dagster, plain):.1f} "
                f"({attributed(dagster, plain) / dagster['wall']:.1%}) |"
                if ok
                else "n/a |"
            )
        )
    targets = []
    by_label = {label: (dagster, plain) for label, dagster, plain in results}
    million = by_label.get("1,000,000 rows")
    if million and all(run["status"] == 0 for run in million):
        dagster, plain = million
        wall, only = share(dagster, plain), attributed(dagster, plain) / dagster["wall"]
        extra_cpu = (dagster["cpu"] - plain["cpu"]) / dagster["wall"]
        met = "met" if max(extra_cpu, only) <= SHARE_TARGET else "NOT met"
        targets.append(
            f"Dagster's share of the wall time at 1M rows (target <= 10%): {met} on the "
            f"load-robust measures: its extra CPU seconds are {extra_cpu:.1%} of its wall time "
            f"and its Dagster-only time (start-up, IO manager, gaps, exit) {only:.1%}. The "
            f"difference of the two wall totals is {wall:.1%} at load averages "
            f"{dagster['load']:.1f} / {plain['load']:.1f}: per-step wall differences without "
            "matching CPU differences are other jobs' load, not Dagster."
        )
    cli = next((d for label, d, _ in results if label.startswith("CLI")), None)
    if cli:
        targets.append(
            f"CLI end to end on the demo data: {cli['wall']:.1f} s "
            + ("(target < 60 s: met)" if cli["wall"] < CLI_TARGET_S else "(target < 60 s: NOT met)")
        )
    lines = [
        "",
        f"### Pipeline: Dagster vs plain script ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python benchmarks/pipeline.py --sizes {args.sizes}"
        + (" --no-cli" if args.no_cli else "")
        + f"`; machine: {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the "
        f"end), Python {platform.python_version()}, {versions}. Each run is a fresh process on a "
        "fresh platform home and a fresh Ray head; dagster = `dagster asset materialize -m "
        "mlplatform.definitions --select '*'`, plain = `benchmarks/plain_pipeline.py` (the same "
        "assets invoked directly: no CLI, run/event storage, IO manager or executor). Peak RSS is "
        "the driver process's, CPU time the driver's user + system time (Ray's processes not "
        "counted in either); per-step CPU and peak RSS (VmHWM) from sampling /proc during the run. "
        "Dagster runs the "
        "default tuning budget (10 trials or 60 s); the plain script then runs exactly as many "
        "trials as Dagster completed (the seeded search tries the same parameters), so both "
        "train the same models. Load average: the "
        "higher of the 1-minute load average at the start and the end of the run (other jobs "
        "share the machine; wall times inflate under load, CPU times much less). "
        f"Benchmark wall time {elapsed / 60:.1f} min.",
        "",
        *summary,
        "",
        *(f"- {target}" for target in targets),
    ]
    for label, dagster, plain in results:
        if dagster["status"] == 0 and plain["status"] == 0:
            lines += ["", *comparison_table(label, dagster, plain)]
    return lines


if __name__ == "__main__":
    sys.exit(main())
