"""Command line: ``python -m mlplatform run | stop``.

``run`` materializes the whole asset graph (``retrain_job``) on the Dagster instance in
``DAGSTER_HOME`` (default: under the platform home), so the run appears in the web UI, and prints
the live endpoint with a request to paste. ``stop`` shuts the local Ray head and the endpoint
down.
"""

import argparse
import os
import sys
import time

from mlplatform.settings import load_settings


def run_pipeline() -> int:
    """Materialize every asset and print how to call the endpoint; returns an exit code."""
    import dagster as dg

    from mlplatform.definitions import defs

    settings = load_settings()
    dagster_home = os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home))
    os.makedirs(dagster_home, exist_ok=True)
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("retrain_job").execute_in_process(
            instance=instance, raise_on_error=False
        )
    elapsed = time.perf_counter() - started
    if not result.success:
        failed = [event.step_key for event in result.all_events if event.is_step_failure]
        print(
            f"\nThe run failed at {', '.join(failed) or 'a step'} after {elapsed:.0f}s.",
            file=sys.stderr,
        )
        print(f"Inspect it with `make ui` (run id {result.run_id}).", file=sys.stderr)
        return 1
    endpoint = result.output_for_node("model_endpoint")
    print(
        f"\nAll assets materialized in {elapsed:.0f}s (Dagster run {result.run_id}).\n"
        f"Model {endpoint.model_name} v{endpoint.model_version} is live at {endpoint.url}"
        f"  (OpenAPI: {endpoint.url}/docs)\n\n"
        f"Try it:\n  {endpoint.curl_example}\n"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mlplatform`` and the ``mlplatform`` script."""
    parser = argparse.ArgumentParser(prog="mlplatform", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="materialize the full asset graph, ending with a live endpoint")
    commands.add_parser("stop", help="stop the local Ray head and the endpoint")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_pipeline()
    from mlplatform.serving.cluster import stop_local_head

    stop_local_head()
    return 0


if __name__ == "__main__":
    sys.exit(main())
