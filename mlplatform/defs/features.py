"""Features: the feature spec, a deterministic train/valid/test split, and the drift baseline."""

import json
from collections.abc import Iterator

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from mlplatform.defs.ingest import data_version
from mlplatform.model.dataset import (
    SPLITS,
    FeatureSet,
    SplitParams,
    absent_classes_note,
    split_frame,
    target_balance,
)
from mlplatform.model.leakage import single_feature_auc, single_feature_fit
from mlplatform.model.spec import FeatureSpec, infer_feature_spec
from mlplatform.monitoring.durable import write_atomically
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
            problems.append(f"{split} has a single {spec.strategy.target_kind}")
    # Without classes (regression) no class can be absent: the notes are empty.
    if not problems:
        missing = absent_classes_note(feature_set, "train")
        if missing:
            problems.append(missing.split(":")[0] + ": the model cannot learn them")
        notes += [note for s in ("valid", "test") if (note := absent_classes_note(feature_set, s))]
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
    measure = feature_set.spec.strategy.leakage_measure
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
) -> Iterator[dg.Output[FeatureSet] | dg.AssetCheckResult]:
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
            "target_balance": dg.MetadataValue.json(target_balance(feature_set)),
            "split": "chronological by " + spec.time_column
            if spec.time_column
            else f"random, seed {config.seed}"
            + (", stratified by the target" if spec.strategy.has_classes else ""),
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
    # Written whole and durably: a drift report never reads half a baseline.
    write_atomically(path, view.serialize())
    # What drift comparisons need to know about the columns, next to the profile. The classes
    # keep their JSON type: live labels and predictions are compared with them as logged (a
    # positive class "1" matches no label 1).
    write_atomically(
        reference_sidecar(path),
        json.dumps(
            {
                "task": features.spec.task,
                "classes": list(features.spec.classes),
                "target": features.spec.target,
                "features": dict(features.spec.features),
            }
        ).encode(),
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
