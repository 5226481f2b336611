"""The learning tasks by name: ask :func:`strategy_for` instead of branching on a task's name."""

from __future__ import annotations

from mlplatform.tasks.base import Task, TaskStrategy
from mlplatform.tasks.binary import BinaryTask
from mlplatform.tasks.multiclass import MulticlassTask
from mlplatform.tasks.regression import RegressionTask

TASKS: dict[str, TaskStrategy] = {
    strategy.name: strategy for strategy in (BinaryTask(), MulticlassTask(), RegressionTask())
}
"""Each task's strategy, by the task's name (binary, multiclass, regression)."""


def strategy_for(task: Task | str) -> TaskStrategy:
    """The strategy of a task, by name.

    Raises:
        ValueError: for an unknown task.

    """
    try:
        return TASKS[task]
    except KeyError:
        *names, last = TASKS
        raise ValueError(f"task must be {', '.join(names)} or {last}, got {task!r}") from None
