"""How far one feature alone explains the target: copies and recodings of the label give it away.

A feature that reproduces the target exactly (an identifier that encodes it, the label under
another name) teaches the model nothing that holds at prediction time; one that ranks it almost
perfectly deserves a person's look. Both are measured with the simplest rule per feature.
"""

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.tree import DecisionTreeClassifier

from mlplatform.model.dataset import FeatureSet
from mlplatform.model.pipeline import coerce_features


def _rule_input(values: pd.Series, kind: str) -> pd.Series:
    """A coerced feature as a single-feature rule reads it (datetimes as seconds)."""
    if kind == "datetime":
        return values.map(lambda stamp: stamp.timestamp() if pd.notna(stamp) else np.nan)
    return values


def _rule_fit(
    kind: str, task: str, train: tuple[pd.Series, np.ndarray], other: tuple[pd.Series, np.ndarray]
) -> float:
    """How exactly the simplest rule on one feature, learned on ``train``, reproduces the target.

    Classification: accuracy of a lookup (categorical, boolean: the majority class of each value)
    or of a small decision tree (numeric: a few thresholds); regression: R2 of the per-value mean
    (categorical, boolean) or the absolute Spearman correlation (numeric: any monotone recoding).
    The lower of the score on ``train`` and on ``other`` (the validation split) counts.
    """
    (x_train, y_train), (x_other, y_other) = train, other
    splits = ((x_train, y_train), (x_other, y_other))
    if kind not in ("categorical", "boolean") and task == "regression":
        # Any monotone recoding: nothing to learn, the rank correlation on each split.
        scores = []
        for x, y in splits:
            values = pd.to_numeric(x, errors="coerce").to_numpy(dtype=float)
            known = ~np.isnan(values)
            if known.sum() < 3 or np.ptp(values[known]) == 0 or np.ptp(y[known]) == 0:
                return 0.0
            scores.append(abs(float(stats.spearmanr(values[known], y[known]).statistic)))
        return min(scores)
    # Otherwise the rule is learned once, on the training split, then scored on both.
    if kind in ("categorical", "boolean"):
        by_value = pd.Series(y_train, index=x_train.index).groupby(x_train.astype(str))
        if task == "regression":
            lookup, fallback = by_value.mean(), float(np.mean(y_train))
        else:
            lookup = by_value.agg(lambda group: group.value_counts().index[0])
            fallback = np.bincount(y_train).argmax()

        def guess(x: pd.Series) -> np.ndarray:
            return x.astype(str).map(lookup).fillna(fallback).to_numpy()

    else:
        tree = DecisionTreeClassifier(
            max_leaf_nodes=2 * max(len(np.unique(y_train)), 2), random_state=0
        ).fit(pd.to_numeric(x_train, errors="coerce").to_numpy(dtype=float)[:, None], y_train)

        def guess(x: pd.Series) -> np.ndarray:
            return tree.predict(pd.to_numeric(x, errors="coerce").to_numpy(dtype=float)[:, None])

    if task == "regression":
        return min(float(r2_score(y, guess(x))) if np.ptp(y) > 0 else 0.0 for x, y in splits)
    return min(float(np.mean(guess(x) == y)) for x, y in splits)


def single_feature_fit(feature_set: FeatureSet) -> dict[str, float]:
    """How exactly each feature alone reproduces the target (see :func:`_rule_fit`).

    1.0 means a copy or a deterministic recoding of the target (an identifier that encodes it,
    the label under another name): the model would learn nothing that holds at prediction time.
    """
    spec = feature_set.spec
    if len(feature_set.valid) < 2:
        return {}
    train = coerce_features(feature_set.inputs("train"), spec)
    valid = coerce_features(feature_set.inputs("valid"), spec)
    y_train, y_valid = feature_set.labels("train"), feature_set.labels("valid")
    return {
        name: round(
            _rule_fit(
                kind,
                spec.task,
                (_rule_input(train[name], kind), y_train),
                (_rule_input(valid[name], kind), y_valid),
            ),
            4,
        )
        for name, kind in spec.features.items()
    }


def _binary_views(labels: np.ndarray, task: str) -> list[np.ndarray]:
    """The target as 0/1 arrays a single feature can be ranked against.

    Binary: the labels; multiclass: each class against the rest; regression: above the median.
    """
    if task == "binary":
        return [labels]
    if task == "multiclass":
        return [(labels == k).astype(int) for k in np.unique(labels)]
    return [(labels > np.median(labels)).astype(int)]


def single_feature_auc(feature_set: FeatureSet) -> dict[str, float]:
    """How well each feature alone ranks the training target (max of AUC and 1 - AUC).

    For multiclass targets the mean of the one-vs-rest AUCs counts: a measurement that sets one
    class apart (petal length and setosa, flipper length and Gentoo penguins) is biology, not
    leakage; a feature that ranks every class is suspicious. For regression targets, the AUC of
    separating values above the median from the rest.
    """
    coerced = coerce_features(feature_set.inputs("train"), feature_set.spec)
    views = _binary_views(feature_set.labels("train"), feature_set.spec.task)
    scores = {}
    for name in coerced.columns:
        aucs = []
        for labels in views:
            column = coerced[name]
            if feature_set.spec.features[name] == "categorical":
                column = column.map(pd.Series(labels, index=coerced.index).groupby(column).mean())
            column = _rule_input(column, feature_set.spec.features[name])
            values = pd.to_numeric(column, errors="coerce").astype(float)
            known = values.notna().to_numpy()
            if known.sum() < 10 or len(np.unique(labels[known])) < 2:
                continue
            auc = roc_auc_score(labels[known], values.to_numpy()[known])
            aucs.append(float(max(auc, 1 - auc)))
        if aucs:
            scores[name] = round(float(np.mean(aucs)), 4)
    return scores
