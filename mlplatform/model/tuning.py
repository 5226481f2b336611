"""Bounded hyperparameter search for LightGBM with Optuna, scored on the validation split.

The score is the task's selection metric: ROC AUC for binary classification, log loss for
multiclass and RMSE for regression (see ``TaskStrategy.selection_metric`` and ``tuning_score``).

The search is bounded twice (a number of trials and a wall-clock timeout) so it fits in a
training run, and its first trial always evaluates the caller's base parameters, so the winner is
never worse than the defaults on validation. Nothing here imports Dagster: the caller (the
training asset) decides what to log for each trial through the ``on_trial`` hook.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import lightgbm
import numpy as np
import optuna

from mlplatform.tasks.base import Task
from mlplatform.tasks.strategies import strategy_for

# Trials marked with this user attribute evaluate the base parameters unchanged.
_BASELINE_ATTR = "baseline"

# The searched hyperparameters: name -> (low, high, log scale). The ranges suit small and medium
# tabular data: shallow-to-moderate trees, enough rows per leaf to resist noise, and row/column
# subsampling plus L2 regularisation against overfitting.
_FLOAT_SPACE: dict[str, tuple[float, float, bool]] = {
    "learning_rate": (0.01, 0.2, True),
    "subsample": (0.6, 1.0, False),
    "colsample_bytree": (0.5, 1.0, False),
    "reg_lambda": (1e-3, 10.0, True),
}
_INT_SPACE: dict[str, tuple[int, int]] = {
    "num_leaves": (7, 63),
    "min_child_samples": (5, 100),
}
SEARCHED_PARAMS = (*_FLOAT_SPACE, *_INT_SPACE)

# LightGBM's own default number of boosting rounds, the upper bound when none is given.
_LIGHTGBM_DEFAULT_ROUNDS = 100


@dataclasses.dataclass(frozen=True)
class TuningBudget:
    """How much search a training run may spend.

    Attributes:
        trials: the most trials to run (the first evaluates the base parameters).
        timeout_s: no new trial starts after this many seconds; a running trial is finished.
        seed: seed of the TPE sampler, so the same data and budget give the same search.

    """

    trials: int = 10
    timeout_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials must be at least 1, got {self.trials}")
        # `not > 0` also rejects NaN, which would otherwise disable the timeout silently.
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """One evaluated parameter set.

    Attributes:
        number: the trial's position in the search, from 0 (the base parameters).
        params: every LightGBM parameter the trial was fitted with (base plus suggested).
        valid_score: the objective's validation metric at the best iteration.
        best_iteration: the boosting round early stopping kept.
        seconds: wall-clock time of the fit and its scoring.

    """

    number: int
    params: dict[str, Any]
    valid_score: float
    best_iteration: int
    seconds: float


def _baseline_values(base_params: dict[str, Any]) -> dict[str, Any]:
    """The base parameters' values of searched hyperparameters that lie inside the search space.

    Only these are recorded as the baseline trial's suggestions: a value outside a range (for
    example ``reg_lambda=0`` on a log scale) would corrupt the sampler's model of the space.
    """
    values: dict[str, Any] = {}
    for name, (low, high, _) in _FLOAT_SPACE.items():
        value = base_params.get(name)
        if isinstance(value, int | float) and low <= value <= high:
            values[name] = float(value)
    for name, (low, high) in _INT_SPACE.items():
        value = base_params.get(name)
        if isinstance(value, int | np.integer) and low <= value <= high:
            values[name] = int(value)
    return values


def _suggest(trial: optuna.Trial, names: tuple[str, ...]) -> dict[str, Any]:
    """Ask the trial for a value of each named hyperparameter."""
    suggested: dict[str, Any] = {}
    for name in names:
        if name in _FLOAT_SPACE:
            low, high, log = _FLOAT_SPACE[name]
            suggested[name] = trial.suggest_float(name, low, high, log=log)
        else:
            low, high = _INT_SPACE[name]
            suggested[name] = trial.suggest_int(name, low, high)
    return suggested


def tune_lightgbm(
    train_matrix: Any,
    train_labels: np.ndarray,
    valid_matrix: Any,
    valid_labels: np.ndarray,
    budget: TuningBudget,
    base_params: dict[str, Any],
    early_stopping_rounds: int = 50,
    on_trial: Callable[[TrialResult], None] | None = None,
    task: Task = "binary",
) -> tuple[dict[str, Any], list[TrialResult]]:
    """Search LightGBM hyperparameters for the best validation score within a budget.

    Every trial fits the task's LightGBM estimator on the training matrix with early stopping on
    the validation matrix, and is scored by the task's selection metric. The first
    trial fits ``base_params`` exactly as given; later trials
    replace learning_rate, num_leaves, min_child_samples, subsample (with ``subsample_freq=1``),
    colsample_bytree and reg_lambda with values from a TPE sampler seeded by ``budget.seed``.
    ``n_estimators`` in ``base_params`` is the upper bound on boosting rounds.

    Args:
        train_matrix: preprocessed training features (as the model pipeline's preprocessor
            outputs them).
        train_labels: training labels as the model learns them (see ``encode_target``).
        valid_matrix: preprocessed validation features, same columns as ``train_matrix``.
        valid_labels: validation labels, encoded like ``train_labels``.
        budget: the most trials, the timeout and the sampler seed.
        base_params: LightGBM estimator keyword arguments; what the winner is applied to.
            Set ``random_state`` for reproducible trials.
        early_stopping_rounds: stop a trial's boosting after this many rounds without a gain
            in the validation metric.
        on_trial: called with each trial's result as soon as the trial completes (for example
            to log it as a nested MLflow run).
        task: ``binary``, ``multiclass`` or ``regression``.

    Returns:
        ``(best_params, results)``: ``base_params`` updated with the winning trial's searched
        values (and ``subsample_freq=1`` unless the base parameters won) with ``n_estimators``
        set to its best iteration, so refitting on the same training data without early
        stopping reproduces the winning model; and one result per trial in trial order. Ties go
        to the earlier trial, so the base parameters win unless beaten.

    Raises:
        ValueError: if either label array lacks a class (a distinct value for regression) or
            ``early_stopping_rounds`` < 1.

    """
    if early_stopping_rounds < 1:
        raise ValueError(f"early_stopping_rounds must be at least 1, got {early_stopping_rounds}")
    train_labels, valid_labels = np.asarray(train_labels), np.asarray(valid_labels)
    strategy = strategy_for(task)
    strategy.check_tuning_labels(train_labels, "training")
    strategy.check_tuning_labels(valid_labels, "validation")
    maximize = strategy.selection_metric not in strategy.lower_is_better
    baseline = _baseline_values(base_params)
    results: dict[int, TrialResult] = {}

    def objective(trial: optuna.Trial) -> float:
        if trial.user_attrs.get(_BASELINE_ATTR):
            # Recorded for the sampler, but the fit uses base_params untouched: searched
            # parameters absent from them keep LightGBM's defaults, as they would untuned.
            _suggest(trial, tuple(baseline))
            params = dict(base_params)
        else:
            params = base_params | _suggest(trial, SEARCHED_PARAMS) | {"subsample_freq": 1}
        # One thread per fit: trials are small, and on few cores LightGBM's threads fight each
        # other (and the caller), making a trial many times slower. verbose=-1 only mutes
        # LightGBM's per-fit warnings; neither changes the parameters reported for the trial.
        estimator = strategy.lightgbm_estimator(params | {"n_jobs": 1, "verbose": -1})
        started = time.perf_counter()
        estimator.fit(
            train_matrix,
            train_labels,
            eval_X=(valid_matrix,),
            eval_y=(valid_labels,),
            eval_metric=strategy.lightgbm_metric,
            # The objective's metric is listed first, and only it decides stopping, so the kept
            # iteration is the one with the best validation score on that metric.
            callbacks=[
                lightgbm.early_stopping(
                    early_stopping_rounds, first_metric_only=True, verbose=False
                )
            ],
        )
        best_iteration = int(
            estimator.best_iteration_ or params.get("n_estimators", _LIGHTGBM_DEFAULT_ROUNDS)
        )
        # Scored as the candidate comparison scores models (scikit-learn's metric at the best
        # iteration), so the numbers agree across the platform.
        valid_score = strategy.tuning_score(valid_labels, estimator, valid_matrix, best_iteration)
        results[trial.number] = TrialResult(
            number=trial.number,
            params=dict(params),
            valid_score=valid_score,
            best_iteration=best_iteration,
            seconds=time.perf_counter() - started,
        )
        return valid_score

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_trial is not None and trial.number in results:
            on_trial(results[trial.number])

    # Few random trials before TPE models the space: with a budget of ten, TPE's default of ten
    # start-up trials would make the whole search random.
    sampler = optuna.samplers.TPESampler(
        seed=budget.seed, n_startup_trials=min(10, max(1, budget.trials // 2))
    )
    previous_verbosity = optuna.logging.get_verbosity()
    # Optuna logs every trial at INFO; the caller reports trials itself. Restored afterwards so
    # other users of Optuna in the process keep their setting.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        direction = "maximize" if maximize else "minimize"
        study = optuna.create_study(direction=direction, sampler=sampler)
        study.enqueue_trial(baseline, user_attrs={_BASELINE_ATTR: True})
        study.optimize(
            objective, n_trials=budget.trials, timeout=budget.timeout_s, callbacks=[report]
        )
    finally:
        optuna.logging.set_verbosity(previous_verbosity)

    ordered = [results[number] for number in sorted(results)]
    # max()/min() keep the first of equal scores, so a tie never displaces the base parameters.
    pick = max if maximize else min
    best = pick(ordered, key=lambda result: result.valid_score)
    return best.params | {"n_estimators": best.best_iteration}, ordered
