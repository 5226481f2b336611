"""The dataset a model is trained and evaluated on: the splits of the raw data and its spec."""

import dataclasses

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from sklearn.model_selection import train_test_split

from mlplatform.model.pyfunc import encode_target
from mlplatform.model.spec import FeatureSpec

HOLDOUT_SHARE = 0.15
"""The default share of rows in each of the validation and test splits."""

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """The split dataset and its spec; every split keeps the raw input columns and the target."""

    spec: FeatureSpec
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    data_version: str
    time_ordered: bool
    source_uri: str = "unknown"

    def inputs(self, split: str) -> pd.DataFrame:
        """The model input columns of a split."""
        return getattr(self, split)[list(self.spec.features)]

    def labels(self, split: str) -> np.ndarray:
        """A split's target as 0/1 (1 = positive class)."""
        return encode_target(getattr(self, split)[self.spec.target], self.spec)


class SplitParams(BaseModel):
    """How rows are split into train, validation and test."""

    model_config = ConfigDict(frozen=True)

    valid_fraction: float = Field(
        default=HOLDOUT_SHARE, description="Share of rows for validation (model selection)."
    )
    test_fraction: float = Field(
        default=HOLDOUT_SHARE, description="Share of rows for the held-out test."
    )
    seed: int = Field(default=42, description="Seed of the random split (no time column).")


def split_frame(
    frame: pd.DataFrame, spec: FeatureSpec, params: SplitParams
) -> tuple[pd.DataFrame, ...]:
    """Split rows into train/valid/test.

    With a time column the split is chronological (oldest rows train, newest test), so evaluation
    mimics predicting the future; otherwise it is a seeded split stratified by the target.
    """
    n_holdout = params.valid_fraction + params.test_fraction
    if spec.time_column:
        order = pd.to_datetime(frame[spec.time_column], errors="coerce", utc=True, format="mixed")
        ordered = frame.iloc[np.argsort(order.to_numpy(), kind="stable")]
        n = len(ordered)
        train_end = round(n * (1 - n_holdout))
        valid_end = round(n * (1 - params.test_fraction))
        return ordered.iloc[:train_end], ordered.iloc[train_end:valid_end], ordered.iloc[valid_end:]
    stratify = spec.strategy.has_classes
    train, holdout = train_test_split(
        frame,
        test_size=n_holdout,
        random_state=params.seed,
        stratify=frame[spec.target] if stratify else None,
    )
    valid, test = train_test_split(
        holdout,
        test_size=params.test_fraction / n_holdout,
        random_state=params.seed,
        stratify=holdout[spec.target] if stratify else None,
    )
    return train, valid, test


def absent_classes_note(feature_set: FeatureSet, split: str) -> str | None:
    """Why ``split`` has no rows of some classes, or ``None`` when it has them all."""
    spec = feature_set.spec
    absent = spec.strategy.absent_classes(feature_set.labels(split), spec.classes)
    if not absent:
        return None
    names = ", ".join(map(str, absent))
    if not feature_set.time_ordered:
        return f"{split} has no rows of {names}"
    column = spec.time_column
    stamps = pd.to_datetime(getattr(feature_set, split)[column], utc=True, format="mixed")
    return (
        f"{split} ({column} {stamps.min():%Y-%m-%d} to {stamps.max():%Y-%m-%d}) has no rows of "
        f"{names}: a chronological split keeps the newest rows for evaluation and cannot move "
        "older ones there, so its metrics are over the other classes"
    )


def target_balance(feature_set: FeatureSet) -> dict[str, dict[str, float]]:
    """Per split: class shares (classification) or the target's mean and spread (regression)."""
    spec = feature_set.spec
    return {
        split: spec.strategy.target_balance(feature_set.labels(split), spec.classes)
        for split in SPLITS
    }
