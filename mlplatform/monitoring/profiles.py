"""whylogs profiles of training data and live traffic, and where traffic windows live on disk.

Live traffic is profiled per replica into one profile per time window, written as::

    <directory>/<model_name>/v<version>/<window start %Y%m%dT%H%M%SZ>-<replica_id>[-<n>].bin
    <directory>/<model_name>/v<version>/<same name>.json    # rows, window, model, replica

The JSON sidecar is written after the profile and marks it complete; readers
(:func:`list_traffic_windows`, :func:`load_traffic_profiles`) go by the sidecars and never see a
half-written window. Both sides of a drift comparison are profiled in the training dtypes
(:func:`coerce_for_profile`), so they compare. Nothing here imports Dagster or Ray.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import whylogs as why
from whylogs.core import DatasetProfile, DatasetProfileView, DatasetSchema
from whylogs.core.preprocessing import ColumnProperties

from mlplatform.model.pipeline import coerce_features
from mlplatform.model.pyfunc import encode_target
from mlplatform.model.spec import FeatureSpec

WINDOW_STAMP = "%Y%m%dT%H%M%SZ"
"""How a window's start (UTC) appears in profile file names."""

_UNSAFE_PATH_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]+")


def coerce_for_profile(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """A frame's features as they are profiled: the same for the training reference and traffic.

    Training dtypes (:func:`~mlplatform.model.pipeline.coerce_features`: numeric -> float,
    categorical -> string, boolean -> 0.0/1.0), with datetimes as ``%Y-%m-%dT%H:%M:%S`` strings
    in UTC: whylogs has no timestamp type, so both sides must format them the same way to be
    compared.

    Args:
        frame: raw records with every input column of ``spec``.
        spec: the model's feature spec.

    Returns:
        One column per feature, in spec order, same index as ``frame``.

    Raises:
        DataError: if input columns are missing.

    """
    coerced = coerce_features(frame, spec)
    for name in spec.columns_of("datetime"):
        # numpy's formatting in C: the same strings as `.dt.strftime(...)`, 20-50x faster
        stamps = coerced[name].dt.tz_localize(None).to_numpy(dtype="datetime64[s]")
        text = np.datetime_as_string(stamps, unit="s").astype(object)
        text[np.isnat(stamps)] = np.nan
        coerced[name] = text
    return coerced


def path_part(value: Any, what: str) -> str:
    """``value`` as one safe path component (model names and replica ids come from outside)."""
    cleaned = _UNSAFE_PATH_CHARACTERS.sub("_", str(value)).strip(".")
    if not cleaned:
        raise ValueError(f"{what} {value!r} cannot be used in a file name")
    return cleaned


def _model_directory(directory: Path, model_name: str) -> Path:
    return Path(directory) / path_part(model_name, "model name")


def version_directory(directory: Path, model_name: str, version: str) -> Path:
    """Where one model version's traffic windows are written (names made safe for paths)."""
    return _model_directory(directory, model_name) / f"v{path_part(version, 'model version')}"


def as_utc(moment: datetime) -> datetime:
    """Naive datetimes are taken as UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# --- reading profiles back -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrafficWindow:
    """One written window of one replica (from its JSON sidecar; the profile is not opened).

    Attributes:
        model_name: the served model's registered name.
        model_version: the served model version.
        replica_id: the replica that served the traffic.
        start: the window's start (UTC, inclusive).
        end: the window's end (UTC, exclusive).
        rows: records profiled in the window.
        path: the whylogs profile (``.bin``).

    """

    model_name: str
    model_version: str
    replica_id: str
    start: datetime
    end: datetime
    rows: int
    path: Path


class TrafficProfiles(NamedTuple):
    """What :func:`load_traffic_profiles` returns (unpacks as ``view, rows, windows``)."""

    view: DatasetProfileView | None
    rows: int
    windows: list[TrafficWindow]


def _read_sidecar(path: Path) -> TrafficWindow:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        start = datetime.fromisoformat(meta["window_start"])
        return TrafficWindow(
            model_name=str(meta["model_name"]),
            model_version=str(meta["model_version"]),
            replica_id=str(meta["replica_id"]),
            start=start,
            end=datetime.fromtimestamp(start.timestamp() + int(meta["window_s"]), UTC),
            rows=int(meta["rows"]),
            path=path.with_name(meta["profile"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"unreadable traffic window sidecar {path}: {error}") from error


def list_traffic_windows(
    directory: Path,
    model_name: str,
    version: str | None = None,
    since: datetime | None = None,
) -> list[TrafficWindow]:
    """The written traffic windows of a model, oldest first, without opening any profile.

    Args:
        directory: the traffic profiles root the recorders wrote to.
        model_name: the registered model's name.
        version: one model version; ``None`` = every version.
        since: keep windows ending after this moment (naive = UTC); the window containing
            ``since`` is kept whole.

    Returns:
        The windows, sorted by start then replica. Empty when nothing was recorded yet.

    Raises:
        ValueError: if a sidecar is corrupt (delete it and its profile to skip it).

    """
    model_directory = _model_directory(directory, model_name)
    if version is None:
        version_directories = sorted(p for p in model_directory.glob("v*") if p.is_dir())
    else:
        version_directories = [version_directory(directory, model_name, str(version))]
    cutoff = as_utc(since) if since is not None else None
    windows = [
        window
        for version_directory in version_directories
        for window in map(_read_sidecar, sorted(version_directory.glob("*.json")))
        if cutoff is None or window.end > cutoff
    ]
    return sorted(windows, key=lambda w: (w.start, w.replica_id, w.path.name))


def load_traffic_profiles(
    directory: Path,
    model_name: str,
    version: str | None = None,
    since: datetime | None = None,
) -> TrafficProfiles:
    """Merge a model's traffic profiles (e.g. every window since the champion was deployed).

    Args:
        directory: the traffic profiles root the recorders wrote to.
        model_name: the registered model's name.
        version: one model version; ``None`` = every version.
        since: keep windows ending after this moment (naive = UTC).

    Returns:
        ``(view, rows, windows)``: the merged profile (``None`` when there is no traffic), the
        records it covers and the windows merged.

    Raises:
        ValueError: if a sidecar is corrupt.
        OSError: if a profile listed by a sidecar cannot be read.

    """
    windows = list_traffic_windows(directory, model_name, version, since)
    view: DatasetProfileView | None = None
    for window in windows:
        part = DatasetProfileView.deserialize(window.path.read_bytes())
        view = part if view is None else view.merge(part)
    return TrafficProfiles(view, sum(w.rows for w in windows), windows)


def merge_profiles(views: Iterable[DatasetProfileView]) -> DatasetProfileView | None:
    """Merge profiles of consecutive windows into one.

    Counts add up exactly; the KLL, frequent-items and HyperLogLog sketches merge into sketches
    with the same error guarantees as one sketch over all the rows.

    Args:
        views: the profiles to merge.

    Returns:
        The merged profile, or None when there are none.

    """
    merged = None
    for view in views:
        merged = view if merged is None else merged.merge(view)
    return merged


# --------------------------------------------------------------------------------------------
# Fast profiling
# --------------------------------------------------------------------------------------------


def _homogeneous_when_present(column: pd.Series) -> bool:
    """Whether the column's non-null values can skip whylogs' per-value type checks."""
    # Integer columns are fast on the general path already (and the homogeneous one would record
    # their frequent items as "1.000000" rather than "1"); extension dtypes stay there too.
    if not isinstance(column.dtype, np.dtype):
        return False
    if column.dtype.kind == "f":
        # whylogs counts infinities in a per-value check; columns holding any keep that path.
        return not bool(np.isinf(column.to_numpy()).any())
    if column.dtype.kind == "O":
        return pd.api.types.infer_dtype(column, skipna=True) == "string"
    return False


def profile_frame_fast(frame: pd.DataFrame) -> DatasetProfileView:
    """The profile ``why.log(pandas=frame)`` gives, about nine times faster.

    whylogs spends most of its time on a per-value Python check on every float column (counting
    infinities with ``Series.apply``) and, on object columns, six per-value type masks. whylogs'
    schema option ``ColumnProperties.homogeneous`` skips both, but only for columns without
    missing values. So each column is split: its non-null values go through a profile that
    declares the column homogeneous, its nulls (and columns that are not plain numbers or
    strings) through the standard path, and the two profiles are merged. The counts, types,
    distribution, cardinality and frequent items equal ``why.log``'s (KLL sketches are
    randomised, so quantiles agree within the sketch error).

    Args:
        frame: the frame to profile (as prepared for ``why.log``).

    Returns:
        The profile view.

    """
    homogeneous = {
        name: (frame[name].dtype, ColumnProperties.homogeneous)
        for name in frame.columns
        if _homogeneous_when_present(frame[name])
    }
    fast = DatasetProfile(schema=DatasetSchema(types=homogeneous))
    standard = DatasetProfile(schema=DatasetSchema())
    for name in frame.columns:
        column = frame[name]
        if name not in homogeneous:
            standard.track(pandas=column.to_frame(name))
            continue
        missing = column.isna().to_numpy()
        # The homogeneous path reads the first value by label, so the index must start at 0.
        present = column[~missing].reset_index(drop=True)
        if len(present):
            fast.track(pandas=present.to_frame(name))
        if missing.any():
            standard.track(pandas=column[missing].to_frame(name))
    return fast.view().merge(standard.view())


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def profile_frame(frame: pd.DataFrame, spec: FeatureSpec) -> why.DatasetProfileView:
    """Whylogs profile of a frame's features (training dtypes) and target: a drift baseline."""
    coerced = coerce_for_profile(frame, spec)  # as live traffic is profiled, so they compare
    if spec.target in frame.columns:
        coerced[spec.target] = encode_target(frame[spec.target], spec)
    return profile_frame_fast(coerced)


def reference_profile_path(profiles_dir: Path, data_version: str) -> Path:
    """Where the reference profile of the data with ``data_version`` lives (and is looked for).

    Args:
        profiles_dir: the platform's profiles directory (``PlatformSettings.profiles_dir``).
        data_version: the content hash of the ``raw_data`` the model was trained on.

    Returns:
        ``<profiles_dir>/reference/<data_version>.bin``.

    """
    return Path(profiles_dir) / "reference" / f"{data_version}.bin"


def reference_sidecar(profile_path: Path) -> Path:
    """The reference profile's description (task, classes, feature kinds), beside it as JSON."""
    return profile_path.with_suffix(".json")
