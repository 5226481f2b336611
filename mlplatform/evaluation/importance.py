"""Feature importance of a fitted pipeline: the trees' own gain, or permutation importance."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.inspection import permutation_importance

from mlplatform.tasks.strategies import strategy_for

ImportanceMethod = Literal["gain", "permutation"]
"""How :func:`feature_importance` measured: split gain of a tree model, or permutation."""

_DATETIME_PARTS = ("month", "dayofweek", "hour")
# --------------------------------------------------------------------------------------------
# Feature importance
# --------------------------------------------------------------------------------------------


def _tree_output_widths(preprocess: Any, spec: Any) -> list[tuple[str, int]]:
    """``(input column, number of output columns)`` in the fitted column transformer's order.

    Each numeric, boolean or categorical input gives one output column; each datetime input
    gives one per part of its expander (month, day of week, hour).
    """
    kinds = dict(getattr(spec, "features", None) or {})
    widths = []
    for _, transformer, columns in preprocess.transformers_:
        if isinstance(transformer, str) and transformer == "drop":
            continue
        parts = getattr(transformer, "parts", None)
        for column in [columns] if isinstance(columns, str) else list(columns):
            expands = parts is not None or kinds.get(column) == "datetime"
            widths.append((str(column), len(parts or _DATETIME_PARTS) if expands else 1))
    return widths


def feature_importance(
    model: Any, frame: pd.DataFrame, labels: np.ndarray, seed: int = 0
) -> tuple[pd.Series, ImportanceMethod]:
    """How much each input column matters to the model.

    For a LightGBM pipeline (the final estimator has ``booster_``), the total split gain of each
    preprocessed column, summed back to the input column it came from (a datetime column feeds
    month, day of week and hour). Otherwise permutation importance of the whole pipeline on the
    raw ``frame``: the mean drop in the task's score (ROC AUC for binary, negative log loss for
    multiclass, R2 for regression) over 5 shuffles of each input column.

    Args:
        model: a :class:`mlplatform.model.pyfunc.TabularModel` (``.pipeline`` and ``.spec``).
        frame: raw input records (for permutation importance; typically the test split).
        labels: their true labels as the model learns them (see ``encode_target``).
        seed: random seed of the permutations.

    Returns:
        ``(importance, method)``: one value per input column, sorted descending, and ``"gain"``
        or ``"permutation"``.

    Raises:
        ValueError: if the gains do not line up with the column transformer's outputs.

    """
    pipeline = model.pipeline
    estimator = pipeline[-1]
    if hasattr(estimator, "booster_"):
        gains = np.asarray(estimator.booster_.feature_importance("gain"), dtype=float)
        widths = _tree_output_widths(pipeline.named_steps["preprocess"], model.spec)
        if sum(width for _, width in widths) != len(gains):
            raise ValueError(
                f"the booster has {len(gains)} features but the column transformer produces "
                f"{sum(width for _, width in widths)}"
            )
        bounds = np.cumsum([0] + [width for _, width in widths])
        values = {
            column: float(gains[bounds[i] : bounds[i + 1]].sum())
            for i, (column, _) in enumerate(widths)
        }
        importance = pd.Series(values, dtype=float)
        method: ImportanceMethod = "gain"
    else:
        inputs = frame[list(model.spec.features)]
        strategy = strategy_for(getattr(model.spec, "task", "binary"))
        result = permutation_importance(
            pipeline,
            inputs,
            strategy.scoring_targets(labels),
            scoring=strategy.permutation_scoring,
            n_repeats=5,
            random_state=seed,
        )
        importance = pd.Series(result.importances_mean, index=inputs.columns, dtype=float)
        method = "permutation"
    importance = importance.sort_values(ascending=False, kind="stable").rename("importance")
    return importance, method
