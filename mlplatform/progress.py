"""What a person reads while the platform runs a job from the command line.

One line per asset as its step completes (name, seconds, the figure that matters) and the
verdicts of its checks, printed by a Dagster logger; everything else the run and its libraries
write (Dagster's DEBUG event stream, MLflow's and Ray's messages, warnings, even C extensions'
output) goes to a log file. The run's events are also in the Dagster instance, so the web UI shows
the full run as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import dagster as dg


def _value(metadata: Mapping[str, Any], name: str, default: Any = "?") -> Any:
    entry = metadata.get(name)
    return default if entry is None else getattr(entry, "value", entry)


def _endpoint_headline(metadata: Mapping[str, Any]) -> str:
    return f"serving v{_value(metadata, 'model_version')} at {_value(metadata, 'url')}"


def _candidate_headline(metadata: Mapping[str, Any]) -> str:
    metric = next((name for name in metadata if name.startswith("valid_")), None)
    score = (
        f", validation {metric.removeprefix('valid_')} {_value(metadata, metric)}" if metric else ""
    )
    return f"v{_value(metadata, 'model_version')} {_value(metadata, 'algorithm')}{score}"


def _evaluation_headline(metadata: Mapping[str, Any]) -> str:
    champion = _value(metadata, "champion_version")
    against = f"v{champion}" if champion != "none" else "no champion"
    return f"v{_value(metadata, 'challenger_version')} vs {against}: {_value(metadata, 'gate')}"


HEADLINES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "raw_data": lambda m: (
        f"{int(_value(m, 'dagster/row_count', 0)):,} rows x {_value(m, 'columns')} columns "
        f"(data version {_value(m, 'data_version')})"
    ),
    "features": lambda m: (
        f"{_value(m, 'task')}: train {int(_value(m, 'train_rows', 0)):,} / valid "
        f"{int(_value(m, 'valid_rows', 0)):,} / test {int(_value(m, 'test_rows', 0)):,}"
    ),
    "reference_profile": lambda m: f"{int(_value(m, 'rows', 0)):,} training rows profiled",
    "candidate_model": _candidate_headline,
    "evaluation_report": _evaluation_headline,
    "champion_model": lambda m: (
        f"{_value(m, 'decision')} v{_value(m, 'decided_version')}; champion is "
        f"v{_value(m, 'champion_version')}"
    ),
    "model_endpoint": _endpoint_headline,
    "drift_report": lambda m: str(_value(m, "summary")),
    "rollout_report": lambda m: f"{_value(m, 'verdict')}: {_value(m, 'summary')}",
}
"""The figure that matters, per asset, from its materialization's metadata."""


class ProgressHandler(logging.Handler):
    """Prints a line per completed step from the Dagster events a run logs."""

    def __init__(self, stream: TextIO):
        super().__init__(level=logging.DEBUG)
        self.stream = stream
        self.headlines: dict[str, str] = {}
        self.checks: dict[str, list[dg.AssetCheckEvaluation]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        """Remember materializations and checks; print when their step ends."""
        event: dg.DagsterEvent | None = getattr(record, "dagster_event", None)
        if event is None or event.step_key is None:
            return
        step = event.step_key
        if event.is_step_materialization:
            materialization = event.step_materialization_data.materialization
            name = materialization.asset_key.to_user_string()
            headline = HEADLINES.get(name)
            if headline is not None:
                self.headlines[step] = headline(materialization.metadata)
        elif event.event_type_value == dg.DagsterEventType.ASSET_CHECK_EVALUATION.value:
            self.checks.setdefault(step, []).append(event.asset_check_evaluation_data)
        elif event.is_step_success:
            seconds = event.step_success_data.duration_ms / 1000
            self.write(f"  {step:<18} {seconds:5.1f}s  {self.headlines.get(step, 'done')}")
            self.write_checks(step)
        elif event.is_step_failure:
            self.write(f"  {step:<18} failed")
            self.write_checks(step)

    def write_checks(self, step: str) -> None:
        """How many of the step's checks passed, and each failed one with its numbers."""
        checks = self.checks.pop(step, [])
        if not checks:
            return
        passed = sum(check.passed for check in checks)
        self.write(f"  {'':<26}checks: {passed} of {len(checks)} passed")
        for check in checks:
            if not check.passed:
                self.write(f"  {'':<26}{check.check_name} failed: {check.description}")

    def write(self, line: str) -> None:
        """One line to the terminal, at once."""
        self.stream.write(line + "\n")
        self.stream.flush()


def progress_logger(stream: TextIO) -> dg.LoggerDefinition:
    """A Dagster logger that prints each completed step of a run to ``stream``."""

    @dg.logger(description="One line per completed step, for the command line.")
    def progress(_: dg.InitLoggerContext) -> logging.Logger:
        log = logging.getLogger(f"mlplatform.progress.{id(stream)}")
        log.setLevel(logging.DEBUG)
        log.propagate = False
        log.handlers = [ProgressHandler(stream)]
        return log

    return progress


@contextlib.contextmanager
def output_to_log(path: Path) -> Iterator[TextIO]:
    """Send everything this process writes to stdout and stderr to ``path`` for a while.

    Redirects the file descriptors themselves, so the output of libraries and their native
    code goes to the log too, not only what passes through ``sys.stdout``.

    Yields:
        A stream to the terminal (the original standard output).

    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    try:
        with open(path, "a") as log:
            for fd in saved:
                os.dup2(log.fileno(), fd)
            try:
                yield terminal
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                for fd, original in saved.items():
                    os.dup2(original, fd)
    finally:
        terminal.close()
        for original in saved.values():
            os.close(original)
