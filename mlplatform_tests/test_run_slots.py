"""Runs the command line executes take turns with each other and with the run queue's runs."""

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest

from mlplatform.definitions import RETRAIN_TAGS
from mlplatform.defs.serving import ENDPOINT_TAGS
from mlplatform.run_slots import CLI_LAUNCHER, LAUNCHER_TAG, run_turn, serial_tags

REPOSITORY = Path(__file__).resolve().parents[1]


@dg.op
def step() -> None:
    """Nothing: the run records are what the tests look at."""


@dg.job
def queued_job() -> None:
    step()


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _active_run(instance: dg.DagsterInstance, tags: dict[str, str]) -> dg.DagsterRun:
    """A run as the daemon leaves it after launching it from the queue: started, tagged."""
    return instance.create_run_for_job(queued_job, tags=tags, status=dg.DagsterRunStatus.STARTED)


class Command(threading.Thread):
    """A command's run: takes its turn, records when it held it, holds it until released."""

    def __init__(self, instance: dg.DagsterInstance, tags: dict[str, str], run_id: str):
        super().__init__(daemon=True)
        self.instance, self.tags, self.run_id = instance, tags, run_id
        self.said: list[str] = []
        self.inside = threading.Event()
        self.release = threading.Event()
        self.log: list[str] | None = None

    def run(self) -> None:
        with run_turn(self.instance, self.tags, self.run_id, say=self.said.append, poll_s=0.05):
            if self.log is not None:
                self.log.append(f"{self.run_id} in")
            self.inside.set()
            self.release.wait(60)
            if self.log is not None:
                self.log.append(f"{self.run_id} out")


@pytest.mark.parametrize(
    "second_tags", [RETRAIN_TAGS, ENDPOINT_TAGS], ids=["retrain", "deploy-only"]
)
def test_a_second_command_waits_for_the_first_retrain(instance, second_tags):
    log: list[str] = []
    first, second = (
        Command(instance, RETRAIN_TAGS, "run-a"),
        Command(instance, second_tags, "run-b"),
    )
    first.log = second.log = log
    first.start()
    assert first.inside.wait(60)
    second.start()
    _until(lambda: second.said, "the second command to say it waits")
    assert not second.inside.is_set()
    first.release.set()
    second.release.set()
    first.join(60)
    second.join(60)
    assert log == ["run-a in", "run-a out", "run-b in", "run-b out"]
    assert second.said == ["Waiting for run run-a to finish (one at a time) ..."]


def test_a_command_names_a_holder_that_has_taken_the_lock_but_not_yet_written_its_id(instance):
    # The moment between another command's flock and its write, held open for 0.3 s.
    (key, value), *_ = serial_tags(RETRAIN_TAGS)
    path = Path(instance.root_directory) / "locks" / f"{key}={value}.lock".replace("/", "_")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    command = Command(instance, RETRAIN_TAGS, "run-b")
    command.start()
    time.sleep(0.3)
    os.pwrite(descriptor, b"run-a", 0)
    _until(lambda: command.said, "the command to say it waits")
    os.close(descriptor)
    assert command.inside.wait(60)
    command.release.set()
    command.join(60)
    assert command.said == ["Waiting for run run-a to finish (one at a time) ..."]


def test_an_untagged_run_does_not_wait(instance):
    first = Command(instance, RETRAIN_TAGS, "run-a")
    first.start()
    assert first.inside.wait(60)
    drift = Command(instance, {}, "run-b")  # drift_report_job: no queue limit applies
    drift.start()
    assert drift.inside.wait(60)
    first.release.set()
    drift.release.set()
    first.join(60)
    drift.join(60)
    assert drift.said == []


def test_a_command_waits_for_a_retrain_the_queue_launched(instance):
    queued = _active_run(instance, RETRAIN_TAGS)
    command = Command(instance, RETRAIN_TAGS, "run-cli")
    command.start()
    expected = f"Waiting for run {queued.run_id} (queued_job, from the run queue) ..."
    _until(lambda: command.said == [expected], "the command to say it waits for the queued run")
    assert not command.inside.is_set()
    instance.report_run_canceled(queued)
    assert command.inside.wait(60)
    command.release.set()
    command.join(60)


def test_a_run_left_active_by_a_killed_command_is_failed_not_waited_for(instance):
    abandoned = _active_run(instance, {**RETRAIN_TAGS, LAUNCHER_TAG: CLI_LAUNCHER})
    command = Command(instance, RETRAIN_TAGS, "run-cli")
    command.start()
    assert command.inside.wait(60)
    command.release.set()
    command.join(60)
    assert instance.get_run_by_id(abandoned.run_id).status == dg.DagsterRunStatus.FAILURE
    assert command.said == [
        f"Marked run {abandoned.run_id} (queued_job) failed: its command ended without "
        "finishing the run (killed?)."
    ]


OPEN_THE_INSTANCE_AT = """
import sys, time
from mlplatform.cli import dagster_instance
start = float(sys.argv[1])
while time.time() < start:
    pass
with dagster_instance() as instance:
    instance.get_runs()
"""


def test_commands_opening_a_new_home_at_once_leave_it_readable(tmp_path):
    """Unlocked, four commands creating one home's SQLite storages stamp its schema twice."""
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    shutil.copy(REPOSITORY / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "MLPLATFORM_HOME": str(tmp_path)}
    start = time.time() + 8  # every interpreter has imported Dagster by then
    commands = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_THE_INSTANCE_AT, str(start)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    errors = [command.communicate(timeout=120)[1] for command in commands]
    assert [command.returncode for command in commands] == [0] * 4, errors

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.get_runs() == []
