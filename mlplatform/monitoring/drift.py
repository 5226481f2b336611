"""Drift between whylogs profiles: per-column effect sizes, the retrain verdict, fast profiling.

Live traffic is compared with the reference profile of the training data (see ``profile_frame``
in :mod:`mlplatform.defs.features`). whylogs' own drift p-values are not usable as a decision at
production volumes: a KS p-value computed from two KLL sketches treats the sketch's rank error
(about 0.3% for whylogs' default k=1024) as if it were a real difference. Once windows reach
hundreds of thousands of rows that error rivals the KS critical value, and undrifted columns get
flagged (at p < 0.05: about a quarter of them at 300k rows, over half at 1M). And with enough
rows any real but negligible difference is "significant" anyway.

So a column is called drifted when its **effect size** exceeds a bound that is far above both the
sketch error and the sampling noise at the row count seen:

- numeric columns: the KS statistic D (the largest gap between the two CDFs), estimated from the
  KLL sketches; the Hellinger distance on a 20-bin histogram at reference quantiles is reported
  as a second view;
- categorical (string) columns: the Hellinger distance between the category distributions from
  the frequent-items sketches, values unseen in the reference pooled into one bucket.

The KS and chi-square p-values are reported for information only. A column needs at least
``min_rows`` non-null values in the current window before it gets a decision. It is drifted when
its effect exceeds both the bound and the level that sampling noise alone exceeds with
probability 0.1% at the two samples' effective size n_ref * n_cur / (n_ref + n_cur), so a clear
shift is caught against a small reference too; not drifted when the effect is within the bound;
and undecided in between (the samples are too small to tell), never drifted.

Nothing here imports Dagster or Ray.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy import stats
from whylogs.core import ColumnProfileView, DatasetProfileView
from whylogs.core.configs import FrequentItemsErrorType

if TYPE_CHECKING:  # whylogs' sketch library, a dependency of whylogs
    from whylogs_sketching import kll_doubles_sketch

ColumnKind = Literal["numeric", "categorical", "unsupported"]
DriftTest = Literal["ks", "chi-square", "type", "none"]
"""What decided a column: KS, chi-square, a change of value type, or nothing."""

HISTOGRAM_BINS = 20
"""Bins (at reference quantiles) of the numeric Hellinger distance."""

FALSE_ALARM_RATE = 1e-3
"""Chance that sampling noise alone exceeds a bound at the row count a decision requires."""

# Each sketch's CDF is evaluated at this many of its own quantiles (and the other's): between
# neighbouring points neither CDF moves by more than 1/_CDF_POINTS, which bounds the error on D.
_CDF_POINTS = 2049
_OTHER = "<other>"
_FIGURE_SIZE = (6.0, 4.0)
_DPI = 100
_VALUE_TYPES = ("integral", "fractional", "boolean", "string", "object", "tensor")


@dataclasses.dataclass(frozen=True)
class DriftThresholds:
    """When a column counts as drifted and when the drifted share calls for a retrain.

    Attributes:
        ks_bound: a numeric column drifts when its KS statistic D exceeds this. Must exceed the
            sketches' rank error (about 0.003 each for whylogs' default KLL k=1024).
        hellinger_bound: a categorical column drifts when its Hellinger distance exceeds this.
        min_rows: fewer non-null current values than this: no decision for the column.
        drifted_share: share of decided feature columns that must drift to call for a retrain.

    """

    ks_bound: float = 0.1
    hellinger_bound: float = 0.1
    min_rows: int = 500
    drifted_share: float = 0.3

    def __post_init__(self) -> None:
        for name in ("ks_bound", "hellinger_bound", "drifted_share"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be within (0, 1], got {value}")
        if self.min_rows < 1:
            raise ValueError(f"min_rows must be at least 1, got {self.min_rows}")

    def bound(self, kind: ColumnKind) -> float | None:
        """The effect-size bound of a column kind (None for unsupported columns)."""
        if kind == "numeric":
            return self.ks_bound
        if kind == "categorical":
            return self.hellinger_bound
        return None


@dataclasses.dataclass(frozen=True)
class ColumnDrift:
    """The comparison of one column.

    Attributes:
        column: column name.
        kind: ``numeric`` (KS decides), ``categorical`` (Hellinger decides) or ``unsupported``.
        reference_rows: non-null values the reference statistics rest on.
        current_rows: non-null values the current statistics rest on.
        ks_statistic: KS statistic D from the sketches (numeric columns only).
        hellinger: Hellinger distance (numeric: on a histogram at reference quantiles).
        p_value: KS or chi-square p-value, for information only (it never decides).
        test: ``ks``, ``chi-square``, ``type`` (the value type changed) or ``none``.
        decided: whether there were enough rows to decide.
        drifted: whether the effect size exceeds the bound (always False when not decided).
        reason: one sentence on why the column is or is not drifted.

    """

    column: str
    kind: ColumnKind
    reference_rows: int
    current_rows: int
    ks_statistic: float | None
    hellinger: float | None
    p_value: float | None
    test: DriftTest
    decided: bool
    drifted: bool
    reason: str

    @property
    def effect(self) -> float | None:
        """The effect size that decides: KS D for numeric, Hellinger for categorical columns."""
        return self.ks_statistic if self.kind == "numeric" else self.hellinger


@dataclasses.dataclass(frozen=True)
class DriftResult:
    """Per-column drift of a current window against the reference, and the retrain verdict.

    Attributes:
        columns: one entry per compared column, in reference order.
        rows: rows in the current window.
        reference_rows: rows in the reference.
        thresholds: the bounds the verdicts used.

    """

    columns: tuple[ColumnDrift, ...]
    rows: int
    reference_rows: int
    thresholds: DriftThresholds

    @property
    def decided_columns(self) -> list[str]:
        """Columns with enough rows for a decision."""
        return [c.column for c in self.columns if c.decided]

    @property
    def drifted_columns(self) -> list[str]:
        """Columns whose effect size exceeds their bound."""
        return [c.column for c in self.columns if c.drifted]

    @property
    def drifted_share(self) -> float:
        """Drifted columns as a share of decided columns (0 when none was decided)."""
        decided = len(self.decided_columns)
        return len(self.drifted_columns) / decided if decided else 0.0

    @property
    def enough_rows(self) -> bool:
        """Whether the window holds at least ``min_rows`` rows and some column was decided."""
        return self.rows >= self.thresholds.min_rows and bool(self.decided_columns)

    @property
    def should_retrain(self) -> bool:
        """Enough rows, and the drifted share reaches the ``drifted_share`` threshold."""
        return (
            self.enough_rows
            and bool(self.drifted_columns)
            and self.drifted_share >= self.thresholds.drifted_share
        )

    @property
    def reference_note(self) -> str:
        """A sentence when the reference is too small to resolve the KS bound, else empty.

        However much traffic arrives, the effective size stays below the reference's rows, so
        a small reference sets the smallest shift that can ever be told from noise.
        """
        floor = ks_noise_level(self.reference_rows)
        if floor <= self.thresholds.ks_bound:
            return ""
        return (
            f" The reference has {self.reference_rows:,} rows: numeric shifts under KS "
            f"{floor:.2f} cannot be told from noise, however much traffic arrives."
        )

    def summary(self) -> str:
        """One sentence with the numbers behind the verdict."""
        if not self.enough_rows:
            undecided = next((c for c in self.columns if not c.decided), None)
            why = f" ({undecided.column}: {undecided.reason})" if undecided else ""
            return (
                f"No retrain: the window has {self.rows:,} rows and {len(self.decided_columns)} "
                f"columns with enough data for a decision (at least {self.thresholds.min_rows:,} "
                f"rows needed){why}." + self.reference_note
            )
        drifted = [c for c in self.columns if c.drifted]
        decided = len(self.decided_columns)
        comparison = ">=" if self.drifted_share >= self.thresholds.drifted_share else "<"
        verdict = "Retrain" if self.should_retrain else "No retrain"
        details = ", ".join(f"{c.column} ({_effect_text(c)})" for c in drifted)
        undecided = len(self.columns) - decided
        return (
            f"{verdict}: {len(drifted)} of {decided} columns drifted in {self.rows:,} rows "
            f"({self.drifted_share:.0%} {comparison} {self.thresholds.drifted_share:.0%})"
            + (f": {details}" if details else "")
            + (f"; {undecided} without a decision" if undecided else "")
            + "."
            + self.reference_note
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per column: effect size, its bound, p-value, the verdict and its reason."""
        records = [
            {
                "column": c.column,
                "kind": c.kind,
                "test": c.test,
                "reference_rows": c.reference_rows,
                "current_rows": c.current_rows,
                "effect": c.effect,
                "bound": self.thresholds.bound(c.kind),
                "ks_statistic": c.ks_statistic,
                "hellinger": c.hellinger,
                "p_value": c.p_value,
                "decided": c.decided,
                "drifted": c.drifted,
                "reason": c.reason,
            }
            for c in self.columns
        ]
        return pd.DataFrame.from_records(
            records,
            columns=[
                "column",
                "kind",
                "test",
                "reference_rows",
                "current_rows",
                "effect",
                "bound",
                "ks_statistic",
                "hellinger",
                "p_value",
                "decided",
                "drifted",
                "reason",
            ],
        )


def _effect_text(column: ColumnDrift) -> str:
    if column.test == "type":
        return "type changed"
    name = "KS" if column.kind == "numeric" else "Hellinger"
    return f"{name} {column.effect:.3f}"


# --------------------------------------------------------------------------------------------
# Reading the profile
# --------------------------------------------------------------------------------------------


def _value_types(view: ColumnProfileView) -> dict[str, int]:
    metric = view.get_metric("types")
    if metric is None:
        return {}
    return {name: int(getattr(metric, name).value) for name in _VALUE_TYPES}


def _kll(view: ColumnProfileView) -> kll_doubles_sketch | None:
    metric = view.get_metric("distribution")
    return None if metric is None else metric.kll.value


def _numeric_rows(view: ColumnProfileView) -> int:
    sketch = _kll(view)
    return 0 if sketch is None or sketch.is_empty() else int(sketch.get_n())


def column_kind(view: ColumnProfileView) -> ColumnKind:
    """How a profiled column is compared, from its value-type counts.

    Numeric when the distribution sketch holds values and numbers outnumber strings (a few
    stray strings in a numeric column do not change its kind); categorical when strings dominate
    and the frequent-items sketch is there; unsupported otherwise (no values, or only booleans,
    objects or tensors, which whylogs does not sketch).

    Args:
        view: one column of a whylogs profile.

    Returns:
        ``numeric``, ``categorical`` or ``unsupported``.

    """
    strings = _value_types(view).get("string", 0)
    numbers = _numeric_rows(view)
    if numbers and numbers >= strings:
        return "numeric"
    if strings and view.get_metric("frequent_items") is not None:
        return "categorical"
    return "unsupported"


def _category_counts(view: ColumnProfileView) -> tuple[dict[str, float], float, bool]:
    """Category counts, total weight and whether the counts are exact.

    whylogs' frequent-items sketch (``fi_lg_max_k=10``: a 1024-slot map) counts exactly while a
    column has fewer than 768 distinct values; beyond that it purges, the counts become estimates
    (upper bounds) and rare values are missing. Exactness shows as ``lower == upper`` on every item.
    """
    metric = view.get_metric("frequent_items")
    if metric is None or metric.frequent_strings.value.is_empty():
        return {}, 0.0, True
    sketch = metric.frequent_strings.value
    items = sketch.get_frequent_items(
        FrequentItemsErrorType.NO_FALSE_NEGATIVES.to_datasketches_type()
    )
    exact = all(lower == upper for _, _, lower, upper in items)
    return (
        {value: float(estimate) for value, estimate, _, _ in items},
        float(sketch.get_total_weight()),
        exact,
    )


def _profile_rows(view: DatasetProfileView) -> int:
    rows = 0
    for column in view.get_columns().values():
        counts = column.get_metric("counts")
        if counts is not None:
            rows = max(rows, int(counts.n.value))
    return rows


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _hellinger(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / q.sum()
    return float(math.sqrt(max(0.0, 0.5 * float(np.sum((np.sqrt(p) - np.sqrt(q)) ** 2)))))


def sketch_ks_statistic(reference: kll_doubles_sketch, current: kll_doubles_sketch) -> float:
    """The two-sample KS statistic D = sup |F_ref(x) - F_cur(x)| estimated from KLL sketches.

    Both CDFs are evaluated at the union of both sketches' quantiles (``_CDF_POINTS`` each,
    min and max included), once counting values equal to the point and once not, so ties in
    discrete columns are handled like :func:`scipy.stats.ks_2samp` does. The estimate is within
    the two sketches' rank errors plus ``2 / _CDF_POINTS`` of the exact statistic.

    Args:
        reference: the reference column's ``kll_doubles_sketch``.
        current: the current column's ``kll_doubles_sketch``.

    Returns:
        D in [0, 1].

    Raises:
        ValueError: if either sketch is empty.

    """
    if reference.is_empty() or current.is_empty():
        raise ValueError("the KS statistic needs two non-empty sketches")
    fractions = np.linspace(0.0, 1.0, _CDF_POINTS).tolist()
    points = np.unique(
        np.concatenate([reference.get_quantiles(fractions), current.get_quantiles(fractions)])
    )
    points = points[np.isfinite(points)].tolist()
    if not points:
        return 0.0
    gap = 0.0
    for inclusive in (False, True):
        # get_cdf returns one more value than points (the total, 1.0); drop it.
        ref_cdf = np.asarray(reference.get_cdf(points, inclusive=inclusive))[:-1]
        cur_cdf = np.asarray(current.get_cdf(points, inclusive=inclusive))[:-1]
        gap = max(gap, float(np.max(np.abs(ref_cdf - cur_cdf))))
    return gap


def _sketch_rank_error(sketch: kll_doubles_sketch) -> float:
    # An exact sketch (every value retained) has no rank error.
    return float(sketch.normalized_rank_error(False)) if sketch.is_estimation_mode() else 0.0


def _histogram_hellinger(
    reference: kll_doubles_sketch, current: kll_doubles_sketch, bins: int = HISTOGRAM_BINS
) -> float:
    edges = np.unique(reference.get_quantiles(np.linspace(0.0, 1.0, bins + 1)[1:-1].tolist()))
    edges = edges[np.isfinite(edges)].tolist()
    if not edges:
        return 0.0
    return _hellinger(
        np.asarray(reference.get_pmf(edges), dtype=float),
        np.asarray(current.get_pmf(edges), dtype=float),
    )


def effective_rows(reference_rows: float, current_rows: float) -> float:
    """The two-sample effective size n_ref * n_cur / (n_ref + n_cur) that noise scales with."""
    total = reference_rows + current_rows
    return reference_rows * current_rows / total if total else 0.0


def ks_noise_level(effective_rows: float) -> float:
    """The KS statistic that noise alone exceeds with probability ``FALSE_ALARM_RATE``.

    Under no drift sqrt(n_eff) * D follows the Kolmogorov distribution (conservatively so for
    discrete columns), with n_eff the two-sample effective size n_ref * n_cur / (n_ref + n_cur):
    the smaller of the two samples limits it, so a small reference does too.
    """
    if effective_rows <= 0:
        return math.inf
    return float(stats.kstwobign.isf(FALSE_ALARM_RATE) / math.sqrt(effective_rows))


def hellinger_noise_level(effective_rows: float, buckets: int) -> float:
    """The Hellinger distance that noise alone exceeds with probability ``FALSE_ALARM_RATE``.

    For small differences 8 * n_eff * H^2 is the two-sample chi-square statistic, ~ chi2(k - 1)
    under no drift: the more categories, the higher the noise at a given size.
    """
    if effective_rows <= 0:
        return math.inf
    return math.sqrt(stats.chi2.isf(FALSE_ALARM_RATE, max(buckets - 1, 1)) / (8 * effective_rows))


def _no_decision(
    name: str, kind: ColumnKind, reference_rows: int, test: DriftTest, reason: str
) -> ColumnDrift:
    return ColumnDrift(
        column=name,
        kind=kind,
        reference_rows=reference_rows,
        current_rows=0,
        ks_statistic=None,
        hellinger=None,
        p_value=None,
        test=test,
        decided=False,
        drifted=False,
        reason=reason,
    )


def _decision(
    name: str,
    effect: float,
    bound: float,
    noise: float,
    effective_rows: float,
    current_rows: int,
    min_rows: int,
) -> tuple[bool, bool, str]:
    """(decided, drifted, reason) for an effect size, its bound and the noise at its size.

    Drifted: the effect exceeds both the bound and the noise level at the two samples'
    effective size (so a clear shift is caught even against a small reference, and noise alone
    raises a false alarm with probability under ``FALSE_ALARM_RATE``). Not drifted: the effect
    is within the bound. Between the two, the samples are too small to tell.
    """
    if current_rows < min_rows:
        return False, False, f"insufficient data: {current_rows:,} rows, {min_rows:,} needed"
    size = f"noise level {noise:.3f} at {effective_rows:,.0f} effective rows"
    if effect > max(bound, noise):
        return True, True, f"{name} {effect:.3f} > {bound} and > {size}"
    if effect <= bound:
        return True, False, f"{name} {effect:.3f} <= {bound}"
    return False, False, f"undecided: {name} {effect:.3f} > {bound} but within the {size}"


def _compare_numeric(
    name: str, reference: ColumnProfileView, current: ColumnProfileView, thresholds: DriftThresholds
) -> ColumnDrift:
    ref_sketch, cur_sketch = _kll(reference), _kll(current)
    ref_rows, cur_rows = _numeric_rows(reference), _numeric_rows(current)
    if cur_rows == 0:
        return _no_decision(
            name, "numeric", ref_rows, "ks", "insufficient data: no numbers in the current window"
        )
    error = _sketch_rank_error(ref_sketch) + _sketch_rank_error(cur_sketch)
    if thresholds.ks_bound <= error:
        raise ValueError(
            f"ks_bound {thresholds.ks_bound} does not exceed the KLL sketches' rank error "
            f"{error:.4f} on column '{name}': raise the bound or profile with a larger KLL k"
        )
    ks = sketch_ks_statistic(ref_sketch, cur_sketch)
    effective = effective_rows(ref_rows, cur_rows)
    p_value = float(stats.kstwo.sf(ks, round(effective) or 1))
    decided, drifted, reason = _decision(
        "KS",
        ks,
        thresholds.ks_bound,
        ks_noise_level(effective),
        effective,
        cur_rows,
        thresholds.min_rows,
    )
    return ColumnDrift(
        column=name,
        kind="numeric",
        reference_rows=ref_rows,
        current_rows=cur_rows,
        ks_statistic=ks,
        hellinger=_histogram_hellinger(ref_sketch, cur_sketch),
        p_value=p_value,
        test="ks",
        decided=decided,
        drifted=drifted,
        reason=reason,
    )


def _compare_categorical(
    name: str, reference: ColumnProfileView, current: ColumnProfileView, thresholds: DriftThresholds
) -> ColumnDrift:
    ref_counts, ref_total, ref_exact = _category_counts(reference)
    cur_counts, cur_total, cur_exact = _category_counts(current)
    if cur_total == 0:
        return _no_decision(
            name,
            "categorical",
            int(ref_total),
            "chi-square",
            "insufficient data: no strings in the current window",
        )
    categories = list(ref_counts)
    ref_vector = [ref_counts[c] for c in categories]
    cur_vector = [cur_counts.get(c, 0.0) for c in categories]
    # Everything the reference did not record: values never seen (exact reference sketch), or
    # also its rare values (approximate sketch). One bucket either way.
    ref_vector.append(max(0.0, ref_total - sum(ref_vector)))
    cur_vector.append(max(0.0, cur_total - sum(cur_vector)))
    table = np.array([ref_vector, cur_vector])
    table = table[:, table.sum(axis=0) > 0]
    hellinger = _hellinger(table[0], table[1])
    p_value = (
        float(stats.chi2_contingency(table, correction=False).pvalue) if table.shape[1] > 1 else 1.0
    )
    effective = effective_rows(ref_total, cur_total)
    decided, drifted, reason = _decision(
        "Hellinger",
        hellinger,
        thresholds.hellinger_bound,
        hellinger_noise_level(effective, table.shape[1]),
        effective,
        int(cur_total),
        thresholds.min_rows,
    )
    unseen = cur_vector[-1] / cur_total if ref_exact else None
    if unseen:
        reason += f"; {unseen:.1%} of values unseen in the reference"
    if not (ref_exact and cur_exact):
        reason += (
            "; approximate (over 768 distinct values): compared on the frequent values plus one "
            f"'{_OTHER}' bucket"
        )
    return ColumnDrift(
        column=name,
        kind="categorical",
        reference_rows=int(ref_total),
        current_rows=int(cur_total),
        ks_statistic=None,
        hellinger=hellinger,
        p_value=p_value,
        test="chi-square",
        decided=decided,
        drifted=drifted,
        reason=reason,
    )


def _type_change(
    name: str,
    kind: ColumnKind,
    reference: ColumnProfileView,
    current: ColumnProfileView,
    min_rows: int,
) -> ColumnDrift:
    types = _value_types(current)
    rows = sum(types.values())
    dominant = max(types, key=lambda t: types[t]) if rows else "none"
    decided = rows >= min_rows
    return ColumnDrift(
        column=name,
        kind=kind,
        reference_rows=_numeric_rows(reference)
        if kind == "numeric"
        else int(_category_counts(reference)[1]),
        current_rows=rows,
        ks_statistic=None,
        hellinger=None,
        p_value=None,
        test="type",
        decided=decided,
        drifted=decided,
        reason=(
            f"type changed: {kind} in the reference, mostly {dominant} values in the current window"
            if decided
            else f"insufficient data: {rows:,} {dominant} values, {min_rows:,} needed"
        ),
    )


def compare_profiles(
    reference: DatasetProfileView,
    current: DatasetProfileView,
    thresholds: DriftThresholds | None = None,
    columns: Sequence[str] | None = None,
    exclude: Collection[str] = (),
) -> DriftResult:
    """Decide, per column, whether the current window drifted from the reference.

    Args:
        reference: profile of the training data (the baseline).
        current: profile of the window of traffic to check.
        thresholds: the bounds; :class:`DriftThresholds` defaults when None.
        columns: the columns to compare; by default every column in both profiles (so the
            reference's target and the traffic's prediction column drop out by themselves).
        exclude: columns never compared (e.g. the time column: time always moves on).

    Returns:
        The per-column comparisons (in reference order) and the retrain verdict.

    Raises:
        KeyError: if a requested column is missing from either profile.
        ValueError: if ``ks_bound`` does not exceed the sketches' rank error.

    """
    thresholds = thresholds or DriftThresholds()
    ref_columns = reference.get_columns()
    cur_columns = current.get_columns()
    if columns is None:
        names = [name for name in ref_columns if name in cur_columns]
    else:
        missing = [name for name in columns if name not in ref_columns or name not in cur_columns]
        if missing:
            raise KeyError(f"columns missing from the reference or current profile: {missing}")
        names = list(columns)
    results = []
    for name in names:
        if name in exclude:
            continue
        ref_view, cur_view = ref_columns[name], cur_columns[name]
        kind = column_kind(ref_view)
        current_kind = column_kind(cur_view)
        if kind == "unsupported":
            results.append(
                _no_decision(
                    name, kind, 0, "none", "not comparable: no numbers or strings in the reference"
                )
            )
        elif current_kind != kind and sum(_value_types(cur_view).values()):
            # Values of another type (an all-null window is no type change, just no data).
            results.append(_type_change(name, kind, ref_view, cur_view, thresholds.min_rows))
        elif kind == "numeric":
            results.append(_compare_numeric(name, ref_view, cur_view, thresholds))
        else:
            results.append(_compare_categorical(name, ref_view, cur_view, thresholds))
    return DriftResult(
        columns=tuple(results),
        rows=_profile_rows(current),
        reference_rows=_profile_rows(reference),
        thresholds=thresholds,
    )


def plot_drift(result: DriftResult) -> bytes:
    """Horizontal bars of each column's effect size, with its bound marked.

    Red bars drifted, blue did not, grey had no decision; the black tick on each bar is the
    bound that column is held to (KS for numeric, Hellinger for categorical).

    Args:
        result: a :func:`compare_profiles` result.

    Returns:
        The figure as PNG bytes.

    """
    shown = list(result.columns)
    figure = Figure(
        figsize=(_FIGURE_SIZE[0], max(_FIGURE_SIZE[1], 1.2 + 0.25 * len(shown))), dpi=_DPI
    )
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(shown))
    effects = [c.effect if c.effect is not None else 0.0 for c in shown]
    colours = ["tab:red" if c.drifted else "tab:blue" if c.decided else "tab:gray" for c in shown]
    axes.barh(positions, effects, color=colours)
    bounds = [result.thresholds.bound(c.kind) for c in shown]
    marked = [(b, p) for b, p in zip(bounds, positions, strict=True) if b is not None]
    if marked:
        axes.scatter(
            [b for b, _ in marked], [p for _, p in marked], marker="|", s=250, color="black"
        )
    labels = [f"{c.column} ({'KS' if c.kind == 'numeric' else 'H'})" for c in shown]
    axes.set_yticks(positions, labels=labels, fontsize="small")
    axes.invert_yaxis()
    axes.legend(
        handles=[
            Patch(color="tab:red", label="drifted"),
            Patch(color="tab:blue", label="within bound"),
            Patch(color="tab:gray", label="no decision"),
            Line2D(
                [], [], color="black", marker="|", linestyle="None", markersize=12, label="bound"
            ),
        ],
        loc="best",
        fontsize="small",
    )
    axes.set(
        xlabel="Effect size (KS D or Hellinger distance)",
        title=f"Drift: {len(result.drifted_columns)} of {len(result.decided_columns)} "
        f"columns, {result.rows:,} rows",
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()
