"""How far one feature alone explains the target: copies and recodings of the label give it away.

A feature that reproduces the target exactly (an identifier that encodes it, the label under
another name) teaches the model nothing that holds at prediction time; one that ranks it almost
perfectly deserves a person's look. Both are measured with the simplest rule per feature.
"""

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from mlplatform.model.dataset import FeatureSet
from mlplatform.model.pipeline import coerce_features


def _rule_input(values: pd.Series, kind: str) -> pd.Series:
    """A coerced feature as a single-feature rule reads it (datetimes as seconds)."""
    if kind == "datetime":
        return values.map(lambda stamp: stamp.timestamp() if pd.notna(stamp) else np.nan)
    return values


def single_feature_fit(feature_set: FeatureSet) -> dict[str, float]:
    """How exactly each feature alone reproduces the target (see ``TaskStrategy.rule_fit``).

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
            spec.strategy.rule_fit(
                kind,
                (_rule_input(train[name], kind), y_train),
                (_rule_input(valid[name], kind), y_valid),
            ),
            4,
        )
        for name, kind in spec.features.items()
    }


def single_feature_auc(feature_set: FeatureSet) -> dict[str, float]:
    """How well each feature alone ranks the training target (max of AUC and 1 - AUC).

    For multiclass targets the mean of the one-vs-rest AUCs counts: a measurement that sets one
    class apart (petal length and setosa, flipper length and Gentoo penguins) is biology, not
    leakage; a feature that ranks every class is suspicious. For regression targets, the AUC of
    separating values above the median from the rest.
    """
    coerced = coerce_features(feature_set.inputs("train"), feature_set.spec)
    views = feature_set.spec.strategy.binary_views(feature_set.labels("train"))
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
