"""The run-scoped IO manager: atomic writes, each run reads its own outputs, retention."""

import pickle
from pathlib import Path

import dagster as dg
import pytest

from mlplatform.defs.storage import (
    RUNS_DIR,
    MissingOutput,
    RunScopedIOManager,
    write_atomically,
)


class FailsWhenPickled:
    """Pickling stops here, after everything before it in the same object was written."""

    def __reduce__(self):
        raise pickle.PicklingError("the disk filled up")


def test_a_failed_write_leaves_the_previous_output_whole(tmp_path):
    path = tmp_path / "runs" / "r1" / "features"
    write_atomically(path, {"rows": list(range(1000))})
    with pytest.raises(pickle.PicklingError):
        # Megabytes are written before pickling fails: a write in place would truncate the file.
        write_atomically(path, [b"x" * 2_000_000, FailsWhenPickled()])
    assert pickle.loads(path.read_bytes()) == {"rows": list(range(1000))}
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


# A chain whose middle step lets another run rewrite the upstream asset before the downstream
# step loads it: the interleaving two concurrent runs produce.
VALUES = {"next": 1}


@dg.asset
def numbers() -> int:
    """A value that differs in every run."""
    value = VALUES["next"]
    VALUES["next"] += 1
    return value


@dg.asset(deps=[numbers])
def interleave(context: dg.AssetExecutionContext) -> None:
    """Another run materializes ``numbers`` while this run is between its steps."""
    other = dg.materialize([numbers], instance=context.instance, resources=_io())
    assert other.success


@dg.asset(deps=[interleave])
def doubled(numbers: int) -> int:
    """Twice the upstream value."""
    return 2 * numbers


def _io(keep_runs: int = 5) -> dict[str, RunScopedIOManager]:
    return {"io_manager": RunScopedIOManager(keep_runs=keep_runs)}


def _path(instance: dg.DagsterInstance, run_id: str, name: str) -> str:
    for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = event.asset_materialization
        if materialization.asset_key == dg.AssetKey(name):
            return str(materialization.metadata["path"].value)
    raise AssertionError(f"run {run_id} did not materialize {name}")


def _read(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """The file each step of the run loaded its input from, as the input events record it."""
    return {
        event.step_key: event.dagster_event.event_specific_data.metadata["path"].value
        for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.LOADED_INPUT)
    }


def test_a_run_reads_its_own_output_after_another_run_wrote_it_later(instance):
    VALUES["next"] = 1
    result = dg.materialize([numbers, interleave, doubled], instance=instance, resources=_io())
    assert result.success
    # The other run wrote numbers=2 after this run's numbers=1; this run still doubled its own.
    assert result.output_for_node("numbers") == 1
    assert result.output_for_node("doubled") == 2
    latest = instance.get_latest_materialization_event(dg.AssetKey("numbers"))
    assert latest.run_id != result.run_id
    # Each output is in its own run's directory.
    storage = Path(instance.storage_directory()) / RUNS_DIR
    assert _path(instance, result.run_id, "numbers") == str(storage / result.run_id / "numbers")
    assert _path(instance, latest.run_id, "numbers") == str(storage / latest.run_id / "numbers")
    assert pickle.loads((storage / latest.run_id / "numbers").read_bytes()) == 2
    assert _read(instance, result.run_id) == {"doubled": str(storage / result.run_id / "numbers")}


def test_an_input_from_an_earlier_run_is_the_one_its_materialization_recorded(instance):
    VALUES["next"] = 10
    first = dg.materialize([numbers], instance=instance, resources=_io())
    second = dg.materialize([numbers], instance=instance, resources=_io())
    later = dg.materialize(
        [numbers, doubled], selection=[doubled], instance=instance, resources=_io()
    )
    assert later.success
    # The latest materialization is the second run's (11), though the first run's file remains.
    assert Path(_path(instance, first.run_id, "numbers")).exists()
    assert later.output_for_node("doubled") == 22
    recorded = _path(instance, second.run_id, "numbers")
    assert _read(instance, later.run_id) == {"doubled": recorded}
    Path(recorded).unlink()
    gone = dg.materialize(
        [numbers, doubled],
        selection=[doubled],
        instance=instance,
        resources=_io(),
        raise_on_error=False,
    )
    assert not gone.success
    failure = next(e for e in gone.all_events if e.is_step_failure)
    error = failure.step_failure_data.error
    while error.cause is not None:
        error = error.cause
    assert MissingOutput.__name__ in error.cls_name
    assert recorded in error.message


def test_retention_keeps_the_newest_runs_and_every_latest_materialization(instance):
    VALUES["next"] = 1
    only_once = dg.materialize([numbers, doubled], instance=instance, resources=_io())
    runs = [
        dg.materialize([numbers], instance=instance, resources=_io(keep_runs=2)).run_id
        for _ in range(5)
    ]
    left = {p.name for p in (Path(instance.storage_directory()) / RUNS_DIR).iterdir()}
    # The newest two runs, and the first run: its `doubled` is still the latest materialization.
    assert left == {*runs[-2:], only_once.run_id}
    # The first run's numbers file stays with its directory; doubled can still be read.
    assert pickle.loads(Path(_path(instance, only_once.run_id, "doubled")).read_bytes()) == 2
