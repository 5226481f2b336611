"""The rollout demo: v2 goes shadow -> canary -> champion under live traffic; v3 is rolled back.

Starts everything on loopback in a fresh platform home (a Ray head on free ports, the source a
CSV the demo replaces with each export of `mlplatform.demo.data.ROLLOUT_EXTRACTS`):

1. v1 is trained on last year's applicants and served (`retrain_job`, as `mlplatform run`);
2. simulated users send today's applicants one record a request (`X-Request-Key` = the user),
   and the true outcome of every answered request is posted to `/feedback`;
3. v2 is trained on this year's export: it passes the gate against v1 and enters the release in
   shadow; `rollout_job` judges the live evidence every `--judge-every-s` until v2 is promoted;
4. v3 is trained on an export whose east-region loans were all marked defaulted by an upstream
   bug: it passes the gate against v2 (its test split has the same bug), enters in shadow, and
   the live evidence rolls it back.

The rollout's minimum evidence is sized so that a stage takes a minute or two at the default
rate (`DEMO_POLICY`). Prints the timeline (elapsed seconds, event, versions, stage, the numbers
of each verdict) and appends it to benchmarks/RESULTS.md. Every process it starts is stopped by
pid at the end.

    python benchmarks/rollout_demo.py [--rate 20] [--users 500] [--judge-every-s 15]
                                      [--timeout-s 600] [--keep] [--no-record]
"""

import argparse
import dataclasses
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
from typing import Any

import httpx
from processes import LOOPBACK, REPO, free_port, start_ray_head, stop

RESULTS = REPO / "benchmarks" / "RESULTS.md"

# The rollout policy of the demo (`MLPLATFORM_ROLLOUT_<FIELD>`). Minimum evidence: 200 requests
# and labels and 30 s per stage, a minute or two at 20 requests/s with a 20% canary. Bounds: the
# demo's loans carry a weak signal (AUC about 0.7) and each model flags at its own F1 threshold,
# so two sound models (v1 and v2) already decide differently on about 30% of applications, and
# their scores differ by about 0.11 on average, as the population moved. Over 200 records, the
# v1 -> v2 figures stay within agreement 0.63, score shift 0.13 and distance 0.20 in 99% of
# samples; v2 -> v3 shifts scores by at least 0.17 (mlplatform_tests/demo/
# test_rollout_scenario.py checks the gap on the full traffic sample). Latency: a stage's p99 of
# a few hundred requests is its few slowest, and on two busy cores one scheduling pause of the
# replica makes it 40 ms where the model scores in 5: the slack is 25 ms, which still catches a
# challenger that scores ten times slower (v3, the linear model, scores in 50-80 ms).
DEMO_POLICY = {
    "MLPLATFORM_ROLLOUT_MIN_REQUESTS": "200",
    "MLPLATFORM_ROLLOUT_MIN_SECONDS": "30",
    "MLPLATFORM_ROLLOUT_MIN_LABELS": "200",
    "MLPLATFORM_ROLLOUT_MIN_AGREEMENT": "0.6",
    "MLPLATFORM_ROLLOUT_MAX_SCORE_SHIFT": "0.15",
    "MLPLATFORM_ROLLOUT_MAX_DISTRIBUTION_DISTANCE": "0.25",
    "MLPLATFORM_ROLLOUT_P99_SLACK_MS": "25",
}


@dataclasses.dataclass
class Event:
    """One line of the timeline."""

    seconds: float
    event: str
    champion: str
    challenger: str
    stage: str
    numbers: str = ""


class Traffic(threading.Thread):
    """Today's applicants from simulated users, in 5-second bursts, every answer labelled."""

    def __init__(self, url: str, rate: float, users: int) -> None:
        super().__init__(daemon=True)
        self.url, self.rate, self.users = url, rate, users
        self.halt = threading.Event()
        self.totals: dict[str, Any] = {"requests": 0, "ok": 0, "labels": 0, "errors": {}}
        self.roles: dict[str, int] = {}

    def run(self) -> None:
        from mlplatform.demo.data import ROLLOUT_LIVE_DRIFT
        from mlplatform.demo.simulate import simulate

        seed = 1000
        while not self.halt.is_set():
            report = simulate(
                self.url,
                rate=self.rate,
                duration_s=5,
                drift=ROLLOUT_LIVE_DRIFT,
                seed=seed,
                users=self.users,
                label_share=1.0,
                label_delay_s=1.0,
            )
            seed += 1
            self.totals["requests"] += report.requests
            self.totals["ok"] += report.ok
            self.totals["labels"] += report.labels_matched
            for name, count in report.errors.items():
                self.totals["errors"][name] = self.totals["errors"].get(name, 0) + count
            for role, count in report.roles.items():
                self.roles[role] = self.roles.get(role, 0) + count


class Demo:
    """The platform under the demo: its home, endpoint, registry and timeline."""

    def __init__(self, home: Path, url: str) -> None:
        self.home, self.url = home, url
        self.started = time.monotonic()
        self.timeline: list[Event] = []

    def release(self) -> tuple[str, str, str]:
        """Champion, challenger and stage as the registry has them (``-`` when none)."""
        from mlplatform.model.registry import CHAMPION_ALIAS
        from mlplatform.resources import MlflowTracking

        tracking = MlflowTracking()
        champion = tracking.version_by_alias(CHAMPION_ALIAS)
        state = tracking.rollout_state()
        return (
            f"v{champion.version}" if champion else "-",
            f"v{state.challenger}" if state else "-",
            state.stage if state else "-",
        )

    def served(self) -> dict[str, Any]:
        """The endpoint's `/healthz` (empty when it does not answer)."""
        try:
            return httpx.get(f"{self.url}/healthz", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def note(self, event: str, numbers: str = "") -> Event:
        """Add an event to the timeline, with the release as the registry has it now."""
        line = Event(time.monotonic() - self.started, event, *self.release(), numbers)
        self.timeline.append(line)
        print(
            f"{line.seconds:6.0f} s  {line.event:38} champion {line.champion:4} challenger "
            f"{line.challenger:4} {line.stage:7} {line.numbers}",
            flush=True,
        )
        return line

    def retrain(self, extract_number: int) -> None:
        """Land the next export and run `retrain_job` on it; note what the gate decided."""
        from mlplatform.cli import execute_job
        from mlplatform.demo.data import ROLLOUT_EXTRACTS, write_extract

        write_extract(self.home / "source" / "loans.csv", ROLLOUT_EXTRACTS[extract_number])
        outcome = execute_job("retrain_job")
        if outcome is None:
            raise RuntimeError(f"the retrain on export {extract_number + 1} failed")
        result, _ = outcome
        report = result.output_for_node("evaluation_report")
        decided = result.asset_materializations_for_node("champion_model")[0].metadata
        self.note(
            f"v{report.challenger.version} trained: {decided['decision'].value}",
            f"gate: {report.gate.reason.split(';')[0]}",
        )

    def judge(self) -> str:
        """Run `rollout_job` (judge the evidence, apply the verdict, deploy); note the verdict.

        Returns:
            The verdict's action (``wait``, ``advance``, ``roll_back``), or the stage reached.

        """
        from mlplatform.cli import execute_job

        outcome = execute_job("rollout_job", what="The rollout judgement")
        if outcome is None:
            raise RuntimeError("rollout_job failed")
        result, _ = outcome
        found = result.asset_materializations_for_node("rollout_report")
        values = {key: getattr(value, "value", value) for key, value in found[0].metadata.items()}
        action = str(values.get("verdict", "?"))
        lines = str(values.get("reasons", "")).splitlines()
        reasons = "; ".join(line.removeprefix("- ") for line in lines if line != "-")
        numbers = verdict_numbers(values.get("evidence") or {})
        self.note(f"judged: {action}", f"{numbers}; {reasons}" if reasons else numbers)
        return action

    def judge_until_done(self, challenger: str, every_s: float, timeout_s: float) -> str:
        """Judge every ``every_s`` until ``challenger`` is champion or out of the release.

        Returns:
            ``promoted`` or ``rolled_back``.

        Raises:
            TimeoutError: after ``timeout_s``.

        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            next_look = time.monotonic() + every_s
            self.judge()
            champion, current, _ = self.release()
            if champion == f"v{challenger}":
                self.note(f"v{challenger} promoted", self.healthz_line())
                return "promoted"
            if current != f"v{challenger}":
                self.note(f"v{challenger} rolled back", self.healthz_line())
                return "rolled_back"
            time.sleep(max(0.0, next_look - time.monotonic()))
        raise TimeoutError(f"v{challenger}'s rollout did not end within {timeout_s:.0f} s")

    def healthz_line(self) -> str:
        """What the endpoint says it serves."""
        health = self.served()
        release = health.get("release") or {}
        if not release.get("challenger"):
            release = {"champion": release.get("champion")} if release else {}
        served = ", ".join(f"{k} {v}" for k, v in release.items() if v is not None)
        return f"endpoint: champion v{health.get('model_version', '?')}" + (
            f", release {served}" if served else ""
        )


def verdict_numbers(evidence: dict[str, Any]) -> str:
    """The numbers a verdict rests on, in a line: requests, the shadow comparison, the labels."""
    parts = [
        f"{evidence.get('seconds_in_stage', 0):.0f} s in stage",
        f"requests champion {evidence.get('champion_requests', 0)} / challenger "
        f"{evidence.get('challenger_requests', 0)}, challenger errors "
        f"{evidence.get('challenger_errors', 0)}",
    ]
    if "champion_p99_ms" in evidence and evidence.get("challenger_p99_ms") is not None:
        parts.append(f"p99 {evidence['champion_p99_ms']} / {evidence['challenger_p99_ms']} ms")
    if "shadow_rows" in evidence:
        parts.append(
            f"{evidence['shadow_rows']} paired records: agreement {evidence['agreement']:.1%}, "
            f"score shift {evidence['score_shift']:.3f}, distance "
            f"{evidence['distribution_distance']:.3f}"
        )
    if "labels" in evidence:
        parts.append(
            f"{evidence['labels']} labels: {evidence['labelled_metric']} difference "
            f"{evidence['difference']:+.4f} [{evidence['difference_low']:+.4f}, "
            f"{evidence['difference_high']:+.4f}]"
        )
    return "; ".join(parts)


def main() -> int:
    """Run the demo; exit status 0 when v2 was promoted and v3 rolled back."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--users", type=int, default=500, help="simulated users")
    parser.add_argument("--judge-every-s", type=float, default=15.0, help="rollout_job cadence")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per rollout, give up after")
    parser.add_argument("--keep", action="store_true", help="keep the temporary platform home")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mlplatform-rollout-demo-"))
    ray_port, serve_port = free_port(), free_port()
    env = {
        "MLPLATFORM_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "MLPLATFORM_RAY_PORT": str(ray_port),
        "MLPLATFORM_SERVE_PORT": str(serve_port),
        "MLPLATFORM_SOURCE": str(home / "source" / "loans.csv"),
        "MLPLATFORM_TARGET": "defaulted",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        **DEMO_POLICY,
    }
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    (home / "dagster").mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster" / "dagster.yaml")
    url = f"http://{LOOPBACK}:{serve_port}"
    demo = Demo(home, url)
    processes: list[subprocess.Popen] = []
    traffic: Traffic | None = None
    outcomes: dict[str, str] = {}
    failure: Exception | None = None
    try:
        # The head the platform would start itself, but in the foreground so it stops by pid.
        processes.append(start_ray_head(ray_port, os.environ.copy(), home / "ray.log"))
        print(f"platform home {home}; endpoint {url}", flush=True)
        demo.note("start")
        demo.retrain(0)
        demo.note("v1 serving", demo.healthz_line())
        traffic = Traffic(url, args.rate, args.users)
        traffic.start()
        demo.retrain(1)
        demo.note("endpoint", demo.healthz_line())
        outcomes["v2"] = demo.judge_until_done("2", args.judge_every_s, args.timeout_s)
        demo.retrain(2)
        demo.note("endpoint", demo.healthz_line())
        outcomes["v3"] = demo.judge_until_done("3", args.judge_every_s, args.timeout_s)
    except (RuntimeError, TimeoutError) as error:  # the timeline so far is still worth keeping
        failure = error
        demo.note("stopped", str(error))
    finally:
        if traffic is not None:
            traffic.halt.set()
            traffic.join(timeout=30)
        _disconnect_ray()
        for process in reversed(processes):
            stop(process, timeout_s=60.0)
    if traffic is not None:
        totals = traffic.totals
        roles = ", ".join(f"{role} {count}" for role, count in sorted(traffic.roles.items()))
        demo.note(
            "traffic stopped",
            f"{totals['requests']} requests, {totals['ok']} answered ({roles}), errors "
            f"{totals['errors'] or 'none'}, {totals['labels']} labels matched",
        )
    if not args.no_record:
        record(demo.timeline, args, outcomes)
    if not args.keep and failure is None:
        shutil.rmtree(home, ignore_errors=True)
    else:
        print(f"platform home kept (logs under logs/): {home}")
    return 0 if outcomes == {"v2": "promoted", "v3": "rolled_back"} else 1


def _disconnect_ray() -> None:
    """Leave the Ray cluster this process joined to deploy, before its head stops."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def record(timeline: list[Event], args: argparse.Namespace, outcomes: dict[str, str]) -> None:
    """Append the timeline to benchmarks/RESULTS.md."""
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("dagster", "ray", "mlflow")
    )
    policy = ", ".join(
        f"{name.removeprefix('MLPLATFORM_ROLLOUT_').lower()} {value}"
        for name, value in DEMO_POLICY.items()
    )
    lines = [
        "",
        f"### Rollout demo ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, {versions}. "
        f"Traffic {args.rate:g} single-record requests/s from {args.users} simulated users, "
        f"every answer labelled; rollout_job every {args.judge_every_s:g} s; policy {policy}. "
        f"Outcome: v2 {outcomes.get('v2', 'unfinished')}, v3 {outcomes.get('v3', 'unfinished')}.",
        "",
        "| s | event | champion | challenger | stage | numbers |",
        "|---|---|---|---|---|---|",
        *(
            f"| {e.seconds:.0f} | {e.event} | {e.champion} | {e.challenger} | {e.stage} "
            f"| {e.numbers.replace('|', '/')} |"
            for e in timeline
        ),
        "",
    ]
    with RESULTS.open("a") as handle:
        handle.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
