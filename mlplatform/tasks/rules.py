"""The simplest single-feature rules the leakage check learns: a lookup per value, a few cuts.

A feature that reproduces the target through one of these rules is a copy or recoding of the
label. Each task scores the rules its own way (see :meth:`TaskStrategy.rule_fit`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

LOOKUP_KINDS = ("categorical", "boolean")
"""Feature kinds whose rule is a lookup of each value; other kinds are ordered numbers."""

Guess = Callable[[pd.Series], np.ndarray]
"""A learned rule: a feature's values -> the target it guesses for each."""


def value_lookup(x_train: pd.Series, y_train: np.ndarray, aggregate: Any, fallback: Any) -> Guess:
    """A rule that answers each value's ``aggregate`` of the training labels.

    Args:
        x_train: the feature's training values (compared as text).
        y_train: the training labels, aligned with ``x_train``.
        aggregate: how a value's labels become its answer (as ``groupby(...).agg`` takes it).
        fallback: the answer for a value not seen in training.

    """
    by_value = pd.Series(y_train, index=x_train.index).groupby(x_train.astype(str))
    lookup = by_value.agg(aggregate)

    def guess(x: pd.Series) -> np.ndarray:
        return x.astype(str).map(lookup).fillna(fallback).to_numpy()

    return guess


def as_numbers(x: pd.Series) -> np.ndarray:
    """A feature's values as floats, NaN where they are not numbers."""
    return pd.to_numeric(x, errors="coerce").to_numpy(dtype=float)
