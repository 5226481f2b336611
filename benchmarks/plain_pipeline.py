"""The asset graph's own functions called directly, without Dagster's run: pipeline.py's baseline.

"Plain" means the same code, not a rewrite: every asset (and any separate asset check) of
``mlplatform.definitions.defs`` is invoked directly, with Dagster's direct invocation
(``dg.build_asset_context()``), in the asset graph's topological order, and each output is handed
to the next asset by hand, in memory. The resources are ``defs``' own (``DataSource``,
``MlflowTracking``, ``RayServe``, with their defaults), set up once for the whole pipeline as the
in-process executor sets them up once per run; every config is its class's defaults (the tuning
budget can be overridden, see below). So the work is the assets' work, their asset checks and
Dagster metadata included. What is left out is Dagster's run machinery: no CLI, no run or event
storage (the contexts get one in-memory ephemeral instance, which direct invocation never writes
to), no IO manager (outputs are not pickled or stored), no executor or step processes.

The order is derived from ``defs`` (the asset graph's toposort), so an asset added later cannot be
skipped silently; an asset whose input no earlier asset produced stops the script with an error,
and so does a failed blocking asset check (as it stops a Dagster run).

Settings come from the environment like the platform's (``MLPLATFORM_HOME``,
``MLPLATFORM_SOURCE``, ``MLPLATFORM_TARGET``, ``MLPLATFORM_SERVE_PORT``, ``MLPLATFORM_RAY_PORT``).
pipeline.py runs exactly as many tuning trials as the Dagster run completed (the seeded search
then tries the same parameters), with ``--tuning-trials N --tuning-timeout-s S``. ``--json``
writes, per asset, its wall window (epoch s), wall seconds and process CPU seconds, the order,
the checks' verdicts and a few facts.

    python benchmarks/plain_pipeline.py [--json timings.json] [--tuning-trials N]
                                        [--tuning-timeout-s S]
"""

import argparse
import inspect
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from mlplatform.definitions import defs

RUN_NAME = "plain_pipeline"


class PipelineError(RuntimeError):
    """The graph cannot be run by hand: a missing input, a failed blocking check."""


def asset_order(definitions: dg.Definitions = defs) -> list[dg.AssetsDefinition]:
    """Every executable asset and check definition of ``definitions``, upstream first.

    The order is the asset graph's toposort of all its entities (assets and checks), so separate
    ``@asset_check`` definitions come after the assets they check. The definitions returned are
    the ones given to ``Definitions`` (the resolved graph's copies have the top-level resources
    and the IO manager bound to them, which direct invocation would set up again per asset).

    Raises:
        PipelineError: if an executable entity of the graph has no definition given.

    """
    graph = definitions.resolve_asset_graph()
    given = [
        item
        for item in (*(definitions.assets or ()), *(definitions.asset_checks or ()))
        if isinstance(item, dg.AssetsDefinition)
    ]
    by_key = {key: item for item in given for key in (*item.keys, *item.check_keys)}
    ordered: dict[int, dg.AssetsDefinition] = {}
    for level in graph.toposorted_entity_keys_by_level:
        for key in level:
            if isinstance(key, dg.AssetKey) and not graph.get(key).is_executable:
                continue
            if key not in by_key:
                raise PipelineError(f"no definition given computes {key.to_user_string()}")
            ordered.setdefault(id(by_key[key]), by_key[key])
    return list(ordered.values())


def step_name(assets_def: dg.AssetsDefinition) -> str:
    """The name Dagster gives the asset's step (its op's name)."""
    return assets_def.op.name


def default_config(assets_def: dg.AssetsDefinition, overrides: Mapping[str, Any]) -> Any:
    """The asset's config class with its defaults (and ``overrides``), or None if it has none."""
    compute_fn = assets_def.op.compute_fn
    if not compute_fn.has_config_arg():
        if overrides:
            raise PipelineError(f"{step_name(assets_def)} takes no config, got {dict(overrides)}")
        return None
    config_class = compute_fn.get_config_arg().annotation
    if not (inspect.isclass(config_class) and issubclass(config_class, dg.Config)):
        raise PipelineError(f"{step_name(assets_def)}: config is not a dg.Config class")
    return config_class(**overrides)


def inputs_for(
    assets_def: dg.AssetsDefinition, values: Mapping[dg.AssetKey, Any]
) -> dict[str, Any]:
    """The asset's data inputs from the outputs so far; deps without data must have run too.

    Raises:
        PipelineError: if an upstream asset has not produced its output yet.

    """
    kwargs = {}
    for name, key in assets_def.keys_by_input_name.items():
        if key not in values:
            raise PipelineError(
                f"{step_name(assets_def)} needs '{key.to_user_string()}', which no earlier asset "
                "produced (an asset outside the graph, or not executable here)"
            )
        if not assets_def.op.input_def_named(name).dagster_type.is_nothing:
            kwargs[name] = values[key]
    return kwargs


def events_of(assets_def: dg.AssetsDefinition, result: Any) -> list[Any]:
    """What one invocation produced, as Dagster events (a generator is drained here)."""
    if inspect.isgenerator(result):
        return list(result)
    if isinstance(result, dg.Output | dg.MaterializeResult | dg.AssetCheckResult):
        return [result]
    outputs = assets_def.op.output_defs
    if len(outputs) != 1:
        raise PipelineError(f"{step_name(assets_def)}: cannot map a plain return to {outputs}")
    return [dg.Output(result, output_name=outputs[0].name)]


class Pipeline:
    """Runs the graph's assets in order on one set of resources, timing each one."""

    def __init__(
        self,
        config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        definitions: dg.Definitions = defs,
    ) -> None:
        self.definitions = definitions
        self.config_overrides = dict(config_overrides or {})
        self.order = asset_order(definitions)
        unknown = set(self.config_overrides) - {step_name(a) for a in self.order}
        if unknown:
            raise PipelineError(f"config for unknown assets: {sorted(unknown)}")
        self.values: dict[dg.AssetKey, Any] = {}
        self.windows: dict[str, tuple[float, float]] = {}
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.checks: dict[str, bool] = {}

    def run(self) -> None:
        """Set the resources up once (as the in-process executor does), run every asset."""
        instance = dg.DagsterInstance.ephemeral()
        # A run record only for the resources' set-up (dagster-mlflow names and tags its MLflow
        # run after it); it is never stored.
        run = dg.DagsterRun(job_name=RUN_NAME)
        given = self.definitions.resources or {}
        with dg.build_resources(given, instance=instance, dagster_run=run) as resources:
            ready = {
                key: dg.ResourceDefinition.hardcoded_resource(getattr(resources, key))
                for key in given
            }
            for assets_def in self.order:
                self.invoke(assets_def, ready, instance)

    def invoke(
        self,
        assets_def: dg.AssetsDefinition,
        resources: Mapping[str, dg.ResourceDefinition],
        instance: dg.DagsterInstance,
    ) -> None:
        """Invoke one asset directly, keep its outputs, check its checks, time it."""
        name = step_name(assets_def)
        config = default_config(assets_def, self.config_overrides.get(name, {}))
        kwargs = inputs_for(assets_def, self.values)
        if config is not None:
            kwargs["config"] = config
        started, clock, cpu = time.time(), time.perf_counter(), time.process_time()
        context = dg.build_asset_context(resources=resources, instance=instance)
        events = events_of(assets_def, assets_def(context, **kwargs))
        self.wall[name] = time.perf_counter() - clock
        self.cpu[name] = time.process_time() - cpu
        self.windows[name] = (started, time.time())
        for event in events:
            self.record(assets_def, event)
        print(f"{name}: {self.wall[name]:.1f} s wall, {self.cpu[name]:.1f} s CPU", flush=True)

    def record(self, assets_def: dg.AssetsDefinition, event: Any) -> None:
        """Keep an output's value for the assets downstream; stop on a failed blocking check."""
        if isinstance(event, dg.Output):
            key = assets_def.keys_by_output_name[event.output_name]
            self.values[key] = event.value
        elif isinstance(event, dg.MaterializeResult):
            key = event.asset_key or assets_def.key
            self.values[key] = event.value
        elif isinstance(event, dg.AssetCheckResult):
            # A check function may leave out the check's name and asset when it has only one.
            specs = [
                s
                for s in assets_def.check_specs
                if event.check_name in (None, s.name) and event.asset_key in (None, s.asset_key)
            ]
            if len(specs) != 1:
                raise PipelineError(f"{step_name(assets_def)}: which check is {event}?")
            spec = specs[0]
            self.checks[spec.key.to_user_string()] = event.passed
            if spec.blocking and not event.passed:
                raise PipelineError(f"blocking check {spec.key.to_user_string()} failed")


def main() -> int:
    """Run the pipeline; write the timings as JSON if asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the per-asset timings and facts here")
    parser.add_argument("--tuning-trials", type=int, help="candidate_model: the trial budget")
    parser.add_argument("--tuning-timeout-s", type=float, help="candidate_model: the time budget")
    args = parser.parse_args()
    training = {
        key: value
        for key, value in (
            ("tuning_trials", args.tuning_trials),
            ("tuning_timeout_s", args.tuning_timeout_s),
        )
        if value is not None
    }
    pipeline = Pipeline({"candidate_model": training} if training else None)
    started = time.perf_counter()
    pipeline.run()
    total = time.perf_counter() - started
    facts = {"checks": pipeline.checks, "config_overrides": pipeline.config_overrides}
    print(f"all assets: {total:.1f} s; checks {pipeline.checks}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "order": [step_name(a) for a in pipeline.order],
                    "windows": pipeline.windows,
                    "wall": pipeline.wall,
                    "cpu": pipeline.cpu,
                    "total": total,
                    "facts": facts,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
