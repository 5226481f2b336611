"""The bounded LightGBM search: budget, baseline trial, winner, reproducibility and the hook."""

import math

import lightgbm
import numpy as np
import optuna
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mlplatform.demo.data import generate_loans
from mlplatform.model.pipeline import build_preprocessor, make_model_pipeline
from mlplatform.model.pyfunc import encode_target
from mlplatform.model.spec import infer_feature_spec
from mlplatform.model.tuning import SEARCHED_PARAMS, TrialResult, TuningBudget, tune_lightgbm

# What the training asset fits by default (TrainingConfig), with fewer rounds to stay fast.
BASE_PARAMS = {
    "n_estimators": 300,
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_child_samples": 20,
    "subsample": 0.8,
    "subsample_freq": 1,
    "colsample_bytree": 0.8,
    "random_state": 42,
    "verbose": -1,
}
TRIALS = 6
GENEROUS = 600.0


@pytest.fixture(scope="module")
def matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Demo loans preprocessed as the LightGBM trainer does: oldest 75% train, newest valid."""
    frame = generate_loans(2000)
    spec = infer_feature_spec(frame, "defaulted")
    order = pd.to_datetime(frame[spec.time_column], utc=True, format="mixed")
    frame = frame.loc[order.sort_values(kind="stable").index]
    cut = int(len(frame) * 0.75)
    train, valid = frame.iloc[:cut], frame.iloc[cut:]
    coerce = make_model_pipeline(spec, build_preprocessor(spec, for_trees=True), "passthrough")
    train_matrix = coerce.fit_transform(train[list(spec.features)])
    valid_matrix = coerce.transform(valid[list(spec.features)])
    return (
        train_matrix,
        encode_target(train[spec.target], spec),
        valid_matrix,
        encode_target(valid[spec.target], spec),
    )


def tune(matrices, budget: TuningBudget, on_trial=None, base_params=None):
    return tune_lightgbm(
        *matrices,
        budget=budget,
        base_params=dict(base_params or BASE_PARAMS),
        early_stopping_rounds=30,
        on_trial=on_trial,
    )


@pytest.fixture(scope="module")
def tuned(matrices) -> tuple[dict, list[TrialResult], list[TrialResult]]:
    """One search with a generous timeout, recording every ``on_trial`` call."""
    calls: list[TrialResult] = []
    best_params, results = tune(matrices, TuningBudget(TRIALS, GENEROUS, seed=3), calls.append)
    return best_params, results, calls


def test_runs_exactly_the_budgeted_trials_when_time_allows(tuned):
    _, results, _ = tuned
    assert [result.number for result in results] == list(range(TRIALS))
    assert all(result.seconds > 0 for result in results)


def test_a_tiny_timeout_stops_the_search_after_at_least_one_trial(matrices):
    _, results = tune(matrices, TuningBudget(trials=50, timeout_s=1e-3))
    assert 1 <= len(results) < 50
    assert results[0].params == BASE_PARAMS


def test_first_trial_fits_the_base_params_as_given(tuned):
    _, results, _ = tuned
    assert results[0].params == BASE_PARAMS
    # Later trials search the space, always with row subsampling switched on.
    for result in results[1:]:
        assert set(SEARCHED_PARAMS) <= set(result.params)
        assert result.params["subsample_freq"] == 1
        assert 0.01 <= result.params["learning_rate"] <= 0.2
        assert 7 <= result.params["num_leaves"] <= 63
        assert 5 <= result.params["min_child_samples"] <= 100
        assert 0.6 <= result.params["subsample"] <= 1.0
        assert 0.5 <= result.params["colsample_bytree"] <= 1.0
        assert 1e-3 <= result.params["reg_lambda"] <= 10.0
    assert len({result.params["learning_rate"] for result in results}) == TRIALS


def test_the_winner_has_the_best_auc_and_never_loses_to_the_base_params(tuned):
    best_params, results, _ = tuned
    best = max(results, key=lambda result: result.valid_score)
    assert best.valid_score == max(result.valid_score for result in results)
    assert best.valid_score >= results[0].valid_score
    assert all(0.5 < result.valid_score <= 1.0 for result in results)
    for name in SEARCHED_PARAMS:
        assert best_params.get(name) == best.params.get(name)
    # Parameters outside the search are the caller's.
    assert best_params["random_state"] == BASE_PARAMS["random_state"]


def test_best_params_carry_the_winning_best_iteration(tuned, matrices):
    best_params, results, _ = tuned
    best = max(results, key=lambda result: result.valid_score)
    assert best_params["n_estimators"] == best.best_iteration
    assert 1 <= best.best_iteration <= BASE_PARAMS["n_estimators"]
    # Refitting with exactly that many rounds and no early stopping reproduces the winner.
    train_matrix, train_labels, valid_matrix, valid_labels = matrices
    model = lightgbm.LGBMClassifier(**(best_params | {"n_jobs": 1}))
    model.fit(train_matrix, train_labels)
    auc = roc_auc_score(valid_labels, model.predict_proba(valid_matrix)[:, 1])
    assert math.isclose(auc, best.valid_score, abs_tol=1e-9)


def test_on_trial_is_called_once_per_trial_in_order(tuned):
    _, results, calls = tuned
    assert calls == results
    assert [call.number for call in calls] == list(range(TRIALS))


def test_the_same_seed_gives_the_same_search(tuned, matrices):
    best_params, results, _ = tuned
    again_params, again = tune(matrices, TuningBudget(TRIALS, GENEROUS, seed=3))
    assert again_params == best_params
    assert [(r.params, r.valid_score, r.best_iteration) for r in again] == [
        (r.params, r.valid_score, r.best_iteration) for r in results
    ]


def test_base_params_missing_searched_values_are_fitted_with_lightgbm_defaults(matrices):
    base = {"n_estimators": 200, "random_state": 0, "verbose": -1}
    best_params, results = tune(matrices, TuningBudget(trials=2), base_params=base)
    assert results[0].params == base
    assert best_params["n_estimators"] == max(results, key=lambda r: r.valid_score).best_iteration


def test_optuna_verbosity_is_left_as_it_was(matrices):
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        tune(matrices, TuningBudget(trials=1))
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(before)


@pytest.mark.parametrize(
    "arguments",
    [
        {"trials": 0},
        {"trials": -3},
        {"timeout_s": 0.0},
        {"timeout_s": -1.0},
        {"timeout_s": math.nan},
    ],
)
def test_invalid_budgets_are_rejected(arguments):
    with pytest.raises(ValueError):
        TuningBudget(**arguments)


def test_single_class_labels_and_no_early_stopping_are_rejected(matrices):
    train_matrix, train_labels, valid_matrix, valid_labels = matrices
    with pytest.raises(ValueError, match="validation"):
        tune_lightgbm(
            train_matrix,
            train_labels,
            valid_matrix,
            np.zeros_like(valid_labels),
            TuningBudget(trials=1),
            BASE_PARAMS,
        )
    with pytest.raises(ValueError, match="early_stopping_rounds"):
        tune_lightgbm(*matrices, TuningBudget(trials=1), BASE_PARAMS, early_stopping_rounds=0)
