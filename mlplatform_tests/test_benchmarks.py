"""The benchmarks measure what they claim: the plain pipeline runs every asset of the graph in
dependency order (the assets' own code, invoked directly), and the drift benchmark's table moves
exactly the columns it says it drifts."""

import importlib.util
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from mlplatform.definitions import defs

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plain():
    return load("plain_pipeline")


def test_plain_pipeline_runs_every_asset_of_defs_after_its_upstreams(plain):
    order = plain.asset_order()
    graph = defs.resolve_asset_graph()

    keys = [key for assets_def in order for key in assets_def.keys]
    assert sorted(keys) == sorted(graph.executable_asset_keys)
    assert len(keys) == len(set(keys))
    checks = {key for assets_def in order for key in assets_def.check_keys}
    assert checks == set(graph.asset_check_keys)

    position = {key: index for index, key in enumerate(keys)}
    for key in keys:
        for parent in graph.get(key).parent_keys:
            assert position[parent] < position[key], (parent, key)
    # The definitions handed to Definitions, not the resolved copies with bound resources and
    # IO manager (direct invocation would set those up again for every asset).
    assert {id(assets_def) for assets_def in order} <= {id(item) for item in defs.assets}
    names = [plain.step_name(assets_def) for assets_def in order]
    assert names.index("raw_data") < names.index("features") < names.index("model_endpoint")


def test_plain_pipeline_hands_outputs_on_and_runs_separate_checks_after_their_asset(plain):
    @dg.asset(check_specs=[dg.AssetCheckSpec("positive", asset="numbers", blocking=True)])
    def numbers():
        yield dg.Output([1, 2, 3])
        yield dg.AssetCheckResult(check_name="positive", passed=True)

    class ScaleConfig(dg.Config):
        factor: int = 10

    @dg.asset
    def scaled(config: ScaleConfig, numbers: list[int]) -> dg.MaterializeResult:
        return dg.MaterializeResult(value=[config.factor * n for n in numbers])

    @dg.asset(deps=[scaled])
    def after(context: dg.AssetExecutionContext) -> str:
        return context.run_id

    @dg.asset_check(asset=scaled)
    def scaled_is_sorted(scaled: list[int]) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=scaled == sorted(scaled))

    definitions = dg.Definitions(assets=[after, scaled, numbers], asset_checks=[scaled_is_sorted])
    pipeline = plain.Pipeline({"scaled": {"factor": 3}}, definitions=definitions)
    names = [plain.step_name(assets_def) for assets_def in pipeline.order]
    # Dagster names a separate check's step after the asset and the check.
    assert names.index("numbers") < names.index("scaled") < names.index("scaled_scaled_is_sorted")
    assert names.index("scaled") < names.index("after")

    pipeline.run()
    assert pipeline.values[dg.AssetKey("scaled")] == [3, 6, 9]
    assert pipeline.values[dg.AssetKey("after")] == "EPHEMERAL"  # direct invocation: no run
    assert pipeline.checks == {"numbers:positive": True, "scaled:scaled_is_sorted": True}
    assert set(pipeline.windows) == set(pipeline.wall) == set(pipeline.cpu) == set(names)


def test_plain_pipeline_fails_loudly_where_it_cannot_run_the_graph(plain):
    @dg.asset
    def downstream(upstream: int) -> int:
        return upstream + 1

    external = dg.Definitions(assets=[dg.AssetSpec("upstream"), downstream])
    with pytest.raises(plain.PipelineError, match="needs 'upstream'"):
        plain.Pipeline(definitions=external).run()

    @dg.asset(check_specs=[dg.AssetCheckSpec("enough", asset="rows", blocking=True)])
    def rows():
        yield dg.Output([])
        yield dg.AssetCheckResult(check_name="enough", passed=False)

    @dg.asset
    def model(rows: list) -> int:
        raise AssertionError("a failed blocking check must stop the pipeline before this")

    blocked = dg.Definitions(assets=[rows, model])
    with pytest.raises(plain.PipelineError, match="blocking check rows:enough failed"):
        plain.Pipeline(definitions=blocked).run()

    with pytest.raises(plain.PipelineError, match="unknown assets"):
        plain.Pipeline({"no_such_asset": {}}, definitions=blocked)


def test_drift_benchmark_moves_exactly_the_drifted_columns():
    drift = load("drift")
    base = drift.loans_table(2000, seed=3)
    moved = drift.loans_table(2000, seed=3, drifted=True)

    assert base.shape == (2000, 22)
    assert list(base.columns) == list(moved.columns)
    assert set(drift.DRIFTED) <= set(base.columns)
    for name in base.columns:
        same = base[name].equals(moved[name])
        assert same is (name not in drift.DRIFTED), name
    # Undrifted samples of the same distribution are independent draws, not copies.
    other = drift.loans_table(2000, seed=4)
    assert not np.allclose(base["age"], other["age"])
