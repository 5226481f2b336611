"""Features: the feature spec, a deterministic train/valid/test split, and the drift baseline."""

import json

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field
from scipy import stats
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.tree import DecisionTreeClassifier

from mlplatform.defs.ingest import data_version
from mlplatform.model.dataset import SPLITS, FeatureSet, SplitParams, split_frame
from mlplatform.model.pipeline import coerce_features
from mlplatform.model.spec import FeatureSpec, infer_feature_spec
from mlplatform.monitoring.profiles import (
    profile_frame,
    reference_profile_path,
    reference_sidecar,
)
from mlplatform.resources import DataSource
from mlplatform.settings import load_settings


class FeaturesConfig(SplitParams, dg.Config):
    """How the data is split and what the data checks block."""

    leakage_exactness: float = Field(
        default=0.999,
        description="Blocking: a feature that alone reproduces the target this exactly (rule "
        "accuracy for classes, |rank correlation| or R2 for values, on both the training and "
        "the validation split) is a copy or recoding of the target: the run stops.",
    )
    dominant_auc: float = Field(
        default=0.98,
        description="Warning: a feature ranking the target this well on its own (single-feature "
        "AUC) is reported for a person to judge; leakage when it is known only after the outcome.",
    )


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


def _absent_from(feature_set: FeatureSet, split: str) -> str | None:
    """Why ``split`` has no rows of some classes, or ``None`` when it has them all."""
    spec = feature_set.spec
    present = set(np.unique(feature_set.labels(split)).tolist())
    absent = [label for k, label in enumerate(spec.classes) if k not in present]
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


def check_split(feature_set: FeatureSet) -> dg.AssetCheckResult:
    """Every split is non-empty and varied, training holds every class, and time is in order.

    A validation or test split without some class passes with the reason (the newest rows of a
    chronological split may lack a rare seasonal class); metrics then cover the classes present.
    Chronological splits must not overlap in time.
    """
    problems, notes = [], []
    spec = feature_set.spec
    for split in SPLITS:
        labels = feature_set.labels(split)
        if len(labels) == 0:
            problems.append(f"{split} is empty")
        elif len(np.unique(labels)) < 2:
            kind = "value" if spec.task == "regression" else "class"
            problems.append(f"{split} has a single {kind}")
    if spec.is_classification and not problems:
        missing = _absent_from(feature_set, "train")
        if missing:
            problems.append(missing.split(":")[0] + ": the model cannot learn them")
        notes += [note for s in ("valid", "test") if (note := _absent_from(feature_set, s))]
    if feature_set.time_ordered and not problems:
        column = feature_set.spec.time_column
        stamps = {
            s: pd.to_datetime(getattr(feature_set, s)[column], utc=True, format="mixed")
            for s in SPLITS
        }
        if (
            stamps["train"].max() > stamps["valid"].min()
            or stamps["valid"].max() > stamps["test"].min()
        ):
            problems.append("chronological splits overlap in time")
    sizes = ", ".join(f"{split} {len(getattr(feature_set, split)):,}" for split in SPLITS)
    return dg.AssetCheckResult(
        check_name="split_sanity",
        passed=not problems,
        description="; ".join(problems + notes) or f"all splits non-empty and varied ({sizes})",
        metadata={f"{split}_rows": len(getattr(feature_set, split)) for split in SPLITS},
    )


def check_leakage(feature_set: FeatureSet, exactness: float) -> dg.AssetCheckResult:
    """Blocking: no feature alone reproduces the target (a copy or recoding of the label)."""
    fits = single_feature_fit(feature_set)
    leaking = {name: fit for name, fit in fits.items() if fit >= exactness}
    best = max(fits.items(), key=lambda item: item[1], default=("none", 0.0))
    measure = "accuracy" if feature_set.spec.is_classification else "fit"
    return dg.AssetCheckResult(
        check_name="no_target_leakage",
        passed=not leaking,
        description=(
            "target leakage: "
            + ", ".join(
                f"{name} reproduces the target ({measure} {fit:.4f})"
                for name, fit in leaking.items()
            )
            + f" on its own, on both the training and the validation split (>= {exactness}). "
            "Remove these columns from the data (a copy, recoding or identifier of the label is "
            "not known when predicting)"
            if leaking
            else f"no feature reproduces the target on its own: the closest is {best[0]} "
            f"({measure} {best[1]:.4f} < {exactness})"
        ),
        metadata={"single_feature_fit": dg.MetadataValue.json(fits), "exactness": exactness},
    )


def check_dominant_feature(feature_set: FeatureSet, max_auc: float) -> dg.AssetCheckResult:
    """Warning: a single feature ranks the target almost perfectly; a person should look."""
    scores = single_feature_auc(feature_set)
    dominant = {name: auc for name, auc in scores.items() if auc >= max_auc}
    return dg.AssetCheckResult(
        check_name="no_dominant_feature",
        passed=not dominant,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            "POSSIBLE TARGET LEAKAGE: "
            + ", ".join(
                f"{name} alone ranks the target with AUC {auc:.3f}"
                for name, auc in dominant.items()
            )
            + f" (>= {max_auc}). If a column is known only after the outcome (spending on a card "
            "that was granted, a field filled in by the decision), drop it and retrain; if it is "
            "genuinely available when predicting, it is a strong feature and the model may keep it"
            if dominant
            else f"best single-feature AUC {max(scores.values(), default=0.5):.3f} < {max_auc}"
        ),
        metadata={"single_feature_auc": dg.MetadataValue.json(scores), "max_auc": max_auc},
    )


def _target_balance(feature_set: FeatureSet) -> dict[str, dict[str, float]]:
    """Per split: class shares (classification) or the target's mean and spread (regression)."""
    spec, balance = feature_set.spec, {}
    for split in SPLITS:
        labels = feature_set.labels(split)
        if spec.task == "regression":
            balance[split] = {"mean": float(labels.mean()), "std": float(labels.std())}
        else:
            shares = np.bincount(labels, minlength=len(spec.classes)) / max(len(labels), 1)
            balance[split] = {
                str(label): round(float(share), 4)
                for label, share in zip(spec.classes, shares, strict=True)
            }
    return balance


def _spec_table(spec: FeatureSpec) -> str:
    rows = [f"| {name} | {kind} | used |" for name, kind in spec.features.items()]
    rows += [f"| {name} | - | dropped: {reason} |" for name, reason in spec.dropped.items()]
    return "| column | kind | use |\n|---|---|---|\n" + "\n".join(rows)


@dg.asset(
    group_name="features",
    kinds={"pandas", "sklearn"},
    owners=["team:ml-platform"],
    check_specs=[
        dg.AssetCheckSpec("split_sanity", asset="features", blocking=True),
        dg.AssetCheckSpec("no_target_leakage", asset="features", blocking=True),
        dg.AssetCheckSpec("no_dominant_feature", asset="features"),
    ],
)
def features(
    context: dg.AssetExecutionContext,
    config: FeaturesConfig,
    raw_data: pd.DataFrame,
    data_source: DataSource,
):
    """Feature spec (inferred types, dropped columns) and the train/valid/test split."""
    spec = infer_feature_spec(
        raw_data,
        data_source.resolved_target(),
        data_source.resolved_time_column(),
        data_source.resolved_task(),
        data_source.resolved_sensitive_features(),
    )
    for name, reason in spec.dropped.items():
        context.log.info(f"dropping column '{name}': {reason}")
    train, valid, test = split_frame(raw_data, spec, config)
    feature_set = FeatureSet(
        spec=spec,
        train=train,
        valid=valid,
        test=test,
        data_version=data_version(raw_data),
        time_ordered=spec.time_column is not None,
        source_uri=data_source.resolved_uri(),
    )
    yield dg.Output(
        feature_set,
        metadata={
            **{f"{split}_rows": len(getattr(feature_set, split)) for split in SPLITS},
            "task": spec.task,
            "target_balance": dg.MetadataValue.json(_target_balance(feature_set)),
            "split": "chronological by " + spec.time_column
            if spec.time_column
            else f"random, seed {config.seed}"
            + (", stratified by the target" if spec.is_classification else ""),
            "features": dg.MetadataValue.md(_spec_table(spec)),
            "data_version": feature_set.data_version,
        },
    )
    yield check_split(feature_set)
    yield check_leakage(feature_set, config.leakage_exactness)
    yield check_dominant_feature(feature_set, config.dominant_auc)


@dg.asset(group_name="features", kinds={"whylogs"}, owners=["team:ml-platform"])
def reference_profile(context: dg.AssetExecutionContext, features: FeatureSet) -> str:
    """Whylogs profile of the training split: the baseline that live traffic is compared with."""
    view = profile_frame(features.train, features.spec)
    path = reference_profile_path(load_settings().profiles_dir, features.data_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    view.write(str(path))
    # What drift comparisons need to know about the columns, next to the profile.
    reference_sidecar(path).write_text(
        json.dumps(
            {
                "task": features.spec.task,
                "classes": [str(label) for label in features.spec.classes],
                "target": features.spec.target,
                "features": dict(features.spec.features),
            }
        )
    )
    summary = view.to_pandas()
    context.add_output_metadata(
        {
            "profile_path": dg.MetadataValue.path(str(path)),
            "rows": len(features.train),
            "columns": dg.MetadataValue.json(sorted(view.get_columns())),
            "summary": dg.MetadataValue.md(
                summary[
                    [
                        c
                        for c in (
                            "counts/n",
                            "counts/null",
                            "distribution/mean",
                            "distribution/stddev",
                        )
                        if c in summary
                    ]
                ]
                .round(4)
                .to_markdown()
            ),
        }
    )
    return str(path)
