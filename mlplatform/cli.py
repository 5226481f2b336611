"""Command line: ``python -m mlplatform run|serve|stop|status|rollout|rollback|lineage``.

``run`` materializes the whole asset graph (``retrain_job``) on the Dagster instance in
``DAGSTER_HOME`` (default: under the platform home), so the run appears in the web UI, and prints
the live endpoint with a request to paste. ``serve`` deploys the registry's champion without
retraining (``deploy_job``), as after ``stop`` or a reboot. ``stop`` shuts the local Ray head and
the endpoint down. ``status [--json]`` shows the champion, the version the endpoint serves and its
traffic counters, the last drift verdict and the last decisions (exit code 1 when the endpoint
does not serve the champion). ``rollback --to VERSION --reason TEXT`` runs ``rollback_job`` on
the same instance: the ``champion`` alias goes back to an earlier version, the decision is
recorded, and the endpoint serves that version. ``rollout status|judge|pause|resume|promote|abort
[--reason TEXT]`` shows or acts on the rollout of a challenger (``rollout_job``).
``lineage --version N`` traces a model version back to the exact ``raw_data`` materialization it
was trained on.
"""

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mlplatform.settings import load_settings

if TYPE_CHECKING:
    import dagster as dg

    from mlplatform.defs.serving import EndpointInfo


@contextlib.contextmanager
def dagster_instance() -> Iterator["dg.DagsterInstance"]:
    """The Dagster instance in ``DAGSTER_HOME``, set to the platform's default when unset.

    Opening an instance creates and migrates its SQLite storages. Two commands opening a new
    home at once would both stamp its schema version and leave it unreadable for good, so the
    opening holds an exclusive lock on ``$DAGSTER_HOME/instance.lock``; using the instance
    afterwards does not.
    """
    import fcntl

    import dagster as dg

    dagster_home = os.environ.setdefault("DAGSTER_HOME", str(load_settings().dagster_home))
    os.makedirs(dagster_home, exist_ok=True)
    with open(os.path.join(dagster_home, "instance.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        instance = dg.DagsterInstance.get()
        fcntl.flock(lock, fcntl.LOCK_UN)
    with instance:
        yield instance


def _root_causes(result: "dg.ExecuteInProcessResult") -> list[tuple[str, str]]:
    """``(step, message)`` of the innermost error of each failed step."""
    causes = []
    for event in result.all_events:
        if not event.is_step_failure or event.step_failure_data is None:
            continue
        error = event.step_failure_data.error
        while error is not None and error.cause is not None:
            error = error.cause
        message = error.message.strip() if error is not None else "unknown error"
        if error is not None and message.split(": ", 1)[0].endswith(error.cls_name):
            message = message.split(": ", 1)[1]  # drop the exception's qualified class name
        causes.append((event.step_key, message))
    return causes


def execute_job(
    job_name: str, run_config: dict[str, Any] | None = None, what: str = "The run"
) -> tuple["dg.ExecuteInProcessResult", float] | None:
    """Execute a job of the Definitions in process, on the instance in ``DAGSTER_HOME``.

    A retrain or a deploy first waits for its turn (:func:`mlplatform.run_slots.run_turn`): for
    the same run started by another command, or launched from the run queue, to finish. Prints
    one line per completed asset; the run's full output (Dagster's event stream,
    libraries' messages) goes to ``$MLPLATFORM_HOME/logs/<run id>.log`` and, as events, to the
    Dagster instance (the web UI).

    Args:
        job_name: the job (``retrain_job``, ``rollback_job``).
        run_config: the run config; default the job's own.
        what: how a failure message names the run.

    Returns:
        ``(result, seconds)`` on success; ``None`` after printing why the run failed.

    """
    import dagster as dg

    from mlplatform.definitions import defs
    from mlplatform.progress import output_to_log, progress_logger
    from mlplatform.run_slots import CLI_LAUNCHER, LAUNCHER_TAG, run_turn

    run_id = str(uuid.uuid4())
    log_path = load_settings().home / "logs" / f"{run_id}.log"
    print(f"Dagster run {run_id} ({job_name}); full log: {log_path}", flush=True)
    job = defs.resolve_job_def(job_name)
    with (
        dagster_instance() as instance,
        run_turn(instance, job.tags, run_id, say=lambda line: print(line, flush=True)),
        output_to_log(log_path) as terminal,
    ):
        started = time.perf_counter()  # the run's own time, not the wait for its turn
        job = job.with_logger_defs({**dg.default_loggers(), "progress": progress_logger(terminal)})
        # A logger runs only when the run config names it: the console (to the log file) and
        # the progress lines (to the terminal).
        loggers = {"console": {"config": {"log_level": "DEBUG"}}, "progress": {}}
        result = job.execute_in_process(
            run_config={**(run_config or {}), "loggers": loggers},
            instance=instance,
            raise_on_error=False,
            run_id=run_id,
            tags={LAUNCHER_TAG: CLI_LAUNCHER},
        )
    elapsed = time.perf_counter() - started
    if result.success:
        return result, elapsed
    causes = _root_causes(result)
    failed = ", ".join(step for step, _ in causes) or "a step"
    print(f"\n{what} failed at {failed} after {elapsed:.0f}s.", file=sys.stderr)
    # A blocking check that failed is the cause: its own description says why, with numbers.
    blocked = [
        check
        for check in result.get_asset_check_evaluations()
        if not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    ]
    reasons = [(c.check_name, c.description or "") for c in blocked] if blocked else causes
    for name, message in reasons:
        print(f"  {name}: {_one_line(message)}", file=sys.stderr)
    decided = any(e.is_step_success and e.step_key == "champion_model" for e in result.all_events)
    # A failed deploy says itself what the endpoint serves and where the champion is.
    if not decided and "model_endpoint" not in {step for step, _ in causes}:
        print("The champion and the endpoint are unchanged.", file=sys.stderr)
    print(f"Full log: {log_path}; the run in the web UI (`make ui`): {run_id}", file=sys.stderr)
    return None


def _one_line(message: str, limit: int = 300) -> str:
    """The first line of an error message, shortened to ``limit`` characters."""
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _endpoint_text(endpoint: "EndpointInfo") -> str:
    return (
        f"Model {endpoint.model_name} v{endpoint.model_version} is live at {endpoint.url}"
        f"  (OpenAPI: {endpoint.url}/docs)\n"
    )


def _try_it_text(endpoint: "EndpointInfo") -> str:
    from mlplatform.serving.keys import CLIENT_KEY_VARIABLE

    key = (
        f"  export {CLIENT_KEY_VARIABLE}=<an API key with the predict scope>\n"
        if endpoint.requires_key
        else ""
    )
    return _endpoint_text(endpoint) + f"\nTry it:\n{key}  {endpoint.curl_example}\n"


def _rollout_text(decision: Any) -> str:
    """How a challenger that entered the release in shadow goes on from here."""
    metadata = {name: value.value for name, value in decision.metadata.items()}
    if metadata.get("decision") != "rollout_started":
        return ""
    return (
        f"\nv{metadata['decided_version']} passed the gate and is in shadow beside champion "
        f"v{metadata['champion_version']}: it scores every request, the champion answers.\n"
        "The rollout sensor moves it on (shadow -> canary -> champion) or rolls it back on its "
        "live evidence while the Dagster daemon runs (`make ui`). By hand:\n"
        "  python -m mlplatform rollout status\n"
        "  python -m mlplatform rollout promote --reason '...'   (or: abort, pause, resume)\n"
    )


def run_pipeline() -> int:
    """Materialize every asset and print how to call the endpoint; returns an exit code."""
    outcome = execute_job("retrain_job")
    if outcome is None:
        return 1
    result, elapsed = outcome
    endpoint = result.output_for_node("model_endpoint")
    rollout = _rollout_text(result.asset_materializations_for_node("champion_model")[0])
    print(f"\nAll assets materialized in {elapsed:.0f}s.\n" + _try_it_text(endpoint) + rollout)
    return 0


def serve_champion() -> int:
    """Deploy the registry's champion without retraining and print how to call it.

    Runs ``deploy_job``, the run the endpoint sensor requests: after ``stop`` or a reboot it
    brings the endpoint back with the same champion. A version that cannot serve is refused and
    whatever served before keeps serving.

    Returns:
        The exit code: 0 when the champion is live, 1 otherwise.

    """
    outcome = execute_job("deploy_job", what="The deploy")
    if outcome is None:
        return 1
    result, elapsed = outcome
    endpoint = result.output_for_node("model_endpoint")
    print(f"\nDeployed the champion in {elapsed:.0f}s.\n" + _try_it_text(endpoint))
    return 0


def rollback(version: str, reason: str) -> int:
    """Point `champion` back at ``version`` and redeploy it; returns an exit code.

    The request is checked by the ``champion_model`` asset: a rollback needs a reason and must go
    to an existing version earlier than the current champion; otherwise nothing changes.
    """
    import dagster as dg

    with dagster_instance() as instance:
        trained = instance.get_latest_materialization_event(dg.AssetKey("evaluation_report"))
    if trained is None:
        print(
            "Nothing to roll back: no model has been evaluated on the Dagster instance in "
            f"{os.environ['DAGSTER_HOME']}. Run `python -m mlplatform run` first.",
            file=sys.stderr,
        )
        return 1
    config = {"action": "rollback", "version": version, "reason": reason}
    outcome = execute_job(
        "rollback_job", {"ops": {"champion_model": {"config": config}}}, what="The rollback"
    )
    if outcome is None:
        return 1
    result, elapsed = outcome
    decision = result.asset_materializations_for_node("champion_model")[0].metadata
    previous = decision["previous_champion"].value
    was = f" (was v{previous})" if previous != "none" else ""
    endpoint = result.output_for_node("model_endpoint")
    print(
        f"\nRolled back in {elapsed:.0f}s (Dagster run {result.run_id}): "
        f"{endpoint.model_name} v{endpoint.model_version} is the champion{was}.\n"
        f"Reason: {decision['reason'].value}\n" + _endpoint_text(endpoint)
    )
    return 0


def rollout(action: str, reason: str) -> int:
    """Show the rollout, or judge, pause, resume, promote or abort it; returns an exit code.

    ``status`` reads the registry and the last verdict (no run); every other action runs
    ``rollout_job`` with that action, so it is recorded like the sensor's and the endpoint
    serves the release after it. ``promote`` and ``abort`` need a reason.
    """
    if action == "status":
        return show_status(rollout_only=True)
    config = {"action": action, "reason": reason or None}
    outcome = execute_job(
        "rollout_job", {"ops": {"rollout_report": {"config": config}}}, what=f"The {action}"
    )
    if outcome is None:
        return 1
    result, elapsed = outcome
    report = result.asset_materializations_for_node("rollout_report")[0].metadata
    endpoint = result.output_for_node("model_endpoint")
    print(
        f"\n{report['summary'].value} ({elapsed:.0f}s, Dagster run {result.run_id}).\n"
        + _endpoint_text(endpoint)
    )
    return 0


def show_lineage(model_name: str, version: str, as_json: bool = False) -> int:
    """Print where a model version came from, down to its raw data; returns an exit code."""
    from mlplatform.lineage import LineageError, trace_model_version

    try:
        with dagster_instance() as instance:
            lineage = trace_model_version(instance, model_name, version)
    except LineageError as error:
        print(f"Cannot trace {model_name} v{version}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(lineage.to_dict(), indent=2) if as_json else lineage.to_markdown())
    return 1 if lineage.problems else 0


def simulate_traffic(args: argparse.Namespace) -> int:
    """Send demo traffic; with drift, move the demo training data to the drifted population."""
    from mlplatform.demo.simulate import move_demo_source, simulate
    from mlplatform.serving.keys import ApiKeyError, client_key

    settings = load_settings()
    if not 0.0 <= args.drift <= 1.0:
        print(f"--drift must be within [0, 1], got {args.drift}", file=sys.stderr)
        return 2
    if args.drift > 0 and settings.source is None:
        path = move_demo_source(settings.data_dir / "demo" / "loans.csv", args.drift)
        print(f"Demo training data moved to the drifted population (drift {args.drift}): {path}")
    try:
        predict_key = client_key("predict", settings.home)
        feedback_key = client_key("feedback", settings.home) if args.labels > 0 else None
    except ApiKeyError as error:
        print(f"Cannot read the API keys: {error}", file=sys.stderr)
        return 2
    url = args.url or settings.endpoint_url
    print(f"Sending {args.rate:g} requests/s for {args.duration:g} s to {url} ...")
    report = simulate(
        url,
        rate=args.rate,
        duration_s=args.duration,
        drift=args.drift,
        seed=args.seed,
        batch_size=args.batch,
        label_share=args.labels,
        label_delay_s=args.label_delay,
        predict_key=predict_key,
        feedback_key=feedback_key,
        users=args.users,
    )
    print(report.summary())
    return 0 if report.ok else 1


def stop_endpoint() -> int:
    """Stop the platform's local Ray head and with it the endpoint; returns an exit code."""
    from mlplatform.serving.cluster import LOOPBACK, LocalHead, port_is_open

    settings = load_settings()
    head = LocalHead(settings.ray_port, settings.ray_dir)
    if head.stop():
        print(f"Stopped the local Ray head on {head.address} and the endpoint.")
        return 0
    if port_is_open(LOOPBACK, head.port):
        print(
            f"A Ray head answers on {head.address} but this platform home "
            f"({settings.home}) did not start it; stop it with `ray stop`.",
            file=sys.stderr,
        )
        return 1
    print("No local Ray head is running.")
    return 0


def show_status(as_json: bool = False, rollout_only: bool = False) -> int:
    """Print the release, what the endpoint serves, drift and decisions; 0 when in sync.

    With ``rollout_only``, only the rollout (the champion, the challenger, its stage and the
    last verdict with its evidence).
    """
    from mlflow import MlflowClient

    from mlplatform.serving.keys import ApiKeyError, bearer_headers, client_key
    from mlplatform.status import collect_status

    settings = load_settings()
    try:
        headers = bearer_headers(client_key("predict", settings.home))
    except ApiKeyError as error:
        print(f"Cannot read the API keys: {error}", file=sys.stderr)
        return 2
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    with dagster_instance() as instance:
        status = collect_status(
            instance,
            client,
            settings.model_name,
            settings.endpoint_url,
            headers=headers,
            metrics_url=settings.metrics_url,
        )
    if rollout_only:
        print(status.rollout_text())
        return 0
    print(json.dumps(status.to_dict(), indent=2, default=str) if as_json else status.to_text())
    return 0 if status.in_sync else 1


def _version(value: str) -> str:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"a model version is a number, got {value!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mlplatform`` and the ``mlplatform`` script."""
    parser = argparse.ArgumentParser(prog="mlplatform", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="materialize the full asset graph, ending with a live endpoint")
    commands.add_parser("serve", help="deploy the registry's champion again, without retraining")
    commands.add_parser("stop", help="stop the local Ray head and the endpoint")
    status = commands.add_parser(
        "status", help="the champion, what the endpoint serves, drift and the last decisions"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    back = commands.add_parser(
        "rollback", help="point `champion` back at an earlier version and serve it"
    )
    back.add_argument(
        "--to",
        required=True,
        type=_version,
        metavar="VERSION",
        dest="version",
        help="model version to serve again (earlier than the current champion)",
    )
    back.add_argument("--reason", default="", help="why (required; recorded on the version)")
    staged = commands.add_parser(
        "rollout", help="show, judge, pause, resume, promote or abort the challenger's rollout"
    )
    staged.add_argument(
        "action",
        nargs="?",
        default="status",
        choices=["status", "judge", "pause", "resume", "promote", "abort"],
        help="status (default): the release and the last verdict; judge: apply the rules now",
    )
    staged.add_argument("--reason", default="", help="why (required for promote and abort)")
    trace = commands.add_parser(
        "lineage", help="trace a model version back to the raw data it was trained on"
    )
    trace.add_argument("--version", required=True, type=_version, help="model version to trace")
    trace.add_argument("--model", default=None, help="registered model (default: the platform's)")
    trace.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    sim = commands.add_parser(
        "simulate", help="send demo traffic (optionally drifted, with labels) to the endpoint"
    )
    sim.add_argument("--rate", type=float, default=20.0, help="requests per second (20)")
    sim.add_argument("--duration", type=float, default=60.0, help="seconds to send (60)")
    sim.add_argument(
        "--drift", type=float, default=0.0, help="0-1: how far the population moved (0)"
    )
    sim.add_argument("--batch", type=int, default=1, help="records per request (1)")
    sim.add_argument(
        "--labels", type=float, default=0.0, help="share of requests to send true labels for (0)"
    )
    sim.add_argument("--label-delay", type=float, default=2.0, help="seconds before labels (2)")
    sim.add_argument("--seed", type=int, default=0, help="random seed (0)")
    sim.add_argument(
        "--users",
        type=int,
        default=None,
        help="simulated users, each naming itself in the X-Request-Key header (none)",
    )
    sim.add_argument("--url", default=None, help="endpoint URL (default: the platform's)")
    args = parser.parse_args(argv)
    if args.command == "simulate":
        return simulate_traffic(args)
    if args.command == "run":
        return run_pipeline()
    if args.command == "serve":
        return serve_champion()
    if args.command == "rollback":
        return rollback(args.version, args.reason)
    if args.command == "status":
        return show_status(args.json)
    if args.command == "rollout":
        return rollout(args.action, args.reason)
    if args.command == "lineage":
        return show_lineage(args.model or load_settings().model_name, args.version, args.json)
    return stop_endpoint()


if __name__ == "__main__":
    sys.exit(main())
