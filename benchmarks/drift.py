"""whylogs profiling throughput, drift decision time and decision quality at 1M rows.

A demo-like table (generate_loans' 15 columns plus 7 more: floats, integers, categories with up
to 50 values, booleans, missing values; 22 columns) is profiled with ``why.log`` and with our
``profile_frame_fast``, in two formats: the raw dtypes a CSV reads as, and the training dtypes the
platform profiles (``coerce_for_profile``, as ``reference_profile`` and live traffic do). Then:

- decision time: ``compare_profiles`` on two 1M-row profiles;
- undrifted control: two independent 1M-row samples of one distribution. Our effect-size
  decision should flag nothing; whylogs' default drift test (KS p-value < 0.05 on numeric
  columns, chi-square p-value < 0.05 on categorical ones, computed from the sketches) and, for
  reference, scipy's tests on the raw values show what p-values flag;
- known drift: batches (1M rows and a 10k-row traffic window) where exactly ``DRIFTED`` moved;
  the decision should flag exactly those.

Prints the tables and appends them to benchmarks/RESULTS.md (``--no-record`` to skip).

    python benchmarks/drift.py [--rows 1000000] [--window-rows 10000] [--repeats 3]

Takes about 5 minutes at 1M rows on two cores (most of it ``why.log`` and generating the data).
"""

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import whylogs as why
from scipy import stats
from whylogs.core import DatasetProfileView
from whylogs.core.configs import SummaryConfig

from mlplatform.demo.data import generate_loans
from mlplatform.model.pyfunc import encode_target
from mlplatform.model.spec import FeatureSpec, infer_feature_spec
from mlplatform.monitoring.drift import DriftResult, column_kind, compare_profiles
from mlplatform.monitoring.profiles import coerce_for_profile, profile_frame_fast

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
TARGET = "defaulted"
THROUGHPUT_TARGET = 150_000  # rows/s for profile_frame_fast
CHANNELS = (("online", "branch", "broker", "partner"), (0.55, 0.25, 0.15, 0.05))
STATES = tuple(f"S{i:02d}" for i in range(50))
_STATE_SHARES = 1.0 / np.arange(1, 51) ** 0.8
STATE_SHARES = tuple(_STATE_SHARES / _STATE_SHARES.sum())
# The columns the drifted batches move, and how (each well past the 0.1 effect-size bound).
DRIFTED = (
    "age",  # 6 years younger: KS about 0.2
    "credit_score",  # 45 points lower: KS about 0.3
    "open_accounts",  # Poisson 7 -> 10: KS about 0.35
    "utilization",  # Beta(2, 3) -> Beta(3, 2): KS about 0.3
    "autopay",  # 70% -> 40% (a boolean: 0/1 in the platform's dtypes)
    "home_ownership",  # RENT/MORTGAGE/OWN 40/45/15 -> 60/30/10: Hellinger about 0.14
    "channel",  # shares reversed: Hellinger about 0.4
)


def loans_table(n_rows: int, seed: int, drifted: bool = False) -> pd.DataFrame:
    """22 demo-like columns: generate_loans without its id and date, plus 7 more.

    Args:
        n_rows: rows.
        seed: random seed (independent seeds give independent samples of one distribution).
        drifted: move the ``DRIFTED`` columns (and only those).

    """
    frame = generate_loans(n_rows, seed=seed).drop(columns=["application_id", "application_date"])
    n = n_rows

    def rng(column: int) -> np.random.Generator:
        # One stream per added column: drifting a column leaves the others' values as they were.
        return np.random.default_rng([seed, column])

    utilization = rng(1).beta(3, 2, n) if drifted else rng(1).beta(2, 3, n)
    frame["utilization"] = np.where(rng(2).random(n) < 0.08, np.nan, (utilization * 100).round(1))
    months = frame["term_months"].to_numpy()
    monthly_rate = frame["interest_rate"].to_numpy() / 1200
    frame["monthly_payment"] = (
        frame["loan_amount"].to_numpy() * monthly_rate / (1 - (1 + monthly_rate) ** -months)
    ).round(2)
    frame["inquiries_6m"] = rng(3).poisson(1.2, n)
    frame["months_since_delinquency"] = np.where(
        rng(4).random(n) < 0.6, np.nan, rng(5).integers(0, 120, n).astype(float)
    )
    names, shares = CHANNELS
    channel = rng(6).choice(names, n, p=shares[::-1] if drifted else shares)
    frame["channel"] = np.where(rng(7).random(n) < 0.01, None, channel)
    frame["state"] = rng(8).choice(STATES, n, p=STATE_SHARES)
    frame["autopay"] = rng(9).random(n) < (0.4 if drifted else 0.7)
    if drifted:
        frame["age"] = frame["age"] - 6
        frame["credit_score"] = (frame["credit_score"] - 45).clip(300, 850)
        frame["open_accounts"] = frame["open_accounts"] + rng(10).poisson(3, n)
        frame["home_ownership"] = rng(11).choice(("RENT", "MORTGAGE", "OWN"), n, p=(0.6, 0.3, 0.1))
    return frame


def platform_dtypes(frame: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """The frame as ``reference_profile`` profiles it (``profile_frame`` without the profiling)."""
    coerced = coerce_for_profile(frame, spec)
    coerced[spec.target] = encode_target(frame[spec.target], spec)
    return coerced


def whylogs_profile(frame: pd.DataFrame) -> DatasetProfileView:
    """whylogs' standard profile of a frame."""
    return why.log(pandas=frame).profile().view()


def timed(function: Callable, *args, repeats: int = 1) -> tuple[object, list[float]]:
    """The last result and every run's seconds."""
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function(*args)
        seconds.append(time.perf_counter() - started)
    return result, seconds


# --------------------------------------------------------------------------------------------
# whylogs' default drift tests, copied from whylogs.viz.utils.drift_calculations (1.6.4):
# whylogs.viz cannot be imported without IPython, which is not installed.
# --------------------------------------------------------------------------------------------


def whylogs_ks_p_value(target, reference) -> float | None:
    """``_compute_ks_test_p_value`` with the default ``KSTestConfig`` (100 quantiles), verbatim."""
    quantiles = list(np.linspace(0, 1, 100))
    if reference.is_empty() or target.is_empty():
        return None
    d_max = 0.0
    target_values = target.get_quantiles(quantiles)
    reference_values = reference.get_quantiles(quantiles)
    count = len(quantiles)
    i, j = 0, 0
    while i < count and j < count:
        if target_values[i] < reference_values[j]:
            point = target_values[i]
            i += 1
        else:
            point = reference_values[j]
            j += 1
        d_max = max(d_max, abs(target.get_cdf([point])[0] - reference.get_cdf([point])[0]))
    for k in range(i, count):
        point = target_values[k]
        d_max = max(d_max, abs(target.get_cdf([point])[0] - reference.get_cdf([point])[0]))
    for k in range(j, count):
        point = reference_values[k]
        d_max = max(d_max, abs(target.get_cdf([point])[0] - reference.get_cdf([point])[0]))
    m, n = sorted([target.get_n(), reference.get_n()], reverse=True)
    return float(stats.distributions.kstwo.sf(d_max, np.round(m * n / (m + n))))


def _frequent_stats(column) -> dict | None:
    """``get_frequent_stats`` with the default ``SummaryConfig``."""
    metric = column.get_metric("frequent_items")
    cardinality = column.get_metric("cardinality")
    if metric is None or not cardinality:
        return None
    items = metric.to_summary_dict(SummaryConfig())["frequent_strings"]
    return {
        "frequent_items": [{"value": x.value, "estimate": x.est} for x in items],
        "total_count": column.get_metric("counts").n.value,
        "unique_count": int(cardinality.hll.value.get_estimate()),
    }


def whylogs_chi2_p_value(target_column, reference_column) -> float | None:
    """``_compute_chi_squared_test_p_value`` on ``get_frequent_stats``, verbatim."""
    target, reference = _frequent_stats(target_column), _frequent_stats(reference_column)
    if not target or not reference:
        return None
    if reference["total_count"] <= 0 or target["total_count"] <= 0:
        return None
    target_items = list(target["frequent_items"])
    reference_items = list(reference["frequent_items"])
    for item in reference_items:  # zero_padding_frequent_items
        if item["value"] not in [x["value"] for x in target_items]:
            target_items.append({"value": item["value"], "estimate": 0})
    for item in target_items:
        if item["value"] not in [x["value"] for x in reference_items]:
            reference_items.append({"value": item["value"], "estimate": 0})
    shares = {x["value"]: x["estimate"] / reference["total_count"] for x in reference_items}
    chi_sq = 0.0
    for item in target_items:
        share = shares.get(item["value"])
        expected = int(share * target["total_count"]) if share is not None else 0
        if expected == 0:
            chi_sq = np.inf
            break
        chi_sq += (item["estimate"] - expected) ** 2 / expected
    degrees = max(target["unique_count"] - 1, 1)
    return float(stats.chi2.sf(chi_sq, degrees))


def whylogs_default_flags(reference: DatasetProfileView, current: DatasetProfileView) -> list[str]:
    """Columns whylogs' default drift report calls drifted (p < 0.05): KS, else chi-square.

    As ``calculate_drift_values``: the KS test where the distribution sketch holds numbers,
    the chi-square test on frequent items otherwise.
    """
    flagged = []
    ref_columns, cur_columns = reference.get_columns(), current.get_columns()
    for name, cur_column in cur_columns.items():
        if name not in ref_columns:
            continue
        ref_column = ref_columns[name]
        cur_kll = cur_column.get_metric("distribution").kll.value
        ref_kll = ref_column.get_metric("distribution").kll.value
        p_value = whylogs_ks_p_value(cur_kll, ref_kll)
        if p_value is None:
            p_value = whylogs_chi2_p_value(cur_column, ref_column)
        if p_value is not None and p_value < 0.05:
            flagged.append(name)
    return flagged


def exact_flags(reference: pd.DataFrame, current: pd.DataFrame, kinds: dict[str, str]) -> list[str]:
    """Columns scipy's tests on the raw values flag at p < 0.05 (ks_2samp; chi-square on counts)."""
    flagged = []
    for name, kind in kinds.items():
        if kind == "numeric":
            p_value = stats.ks_2samp(reference[name].dropna(), current[name].dropna()).pvalue
        elif kind == "categorical":
            table = pd.concat(
                [reference[name].value_counts(), current[name].value_counts()], axis=1
            ).fillna(0)
            p_value = stats.chi2_contingency(table.to_numpy().T, correction=False).pvalue
        else:
            continue
        if p_value < 0.05:
            flagged.append(name)
    return flagged


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def quality_row(
    label: str,
    result: DriftResult,
    whylogs_flags: list[str],
    scipy_flags: list[str],
    expected: set[str],
) -> dict[str, str]:
    """One row of the decision quality table."""
    ours = set(result.drifted_columns)
    false_whylogs = len(set(whylogs_flags) - expected)
    false_scipy = len(set(scipy_flags) - expected)
    undrifted = [c for c in result.columns if c.column not in expected and c.effect is not None]
    return {
        "comparison": label,
        "columns compared": str(len(result.columns)),
        "truly drifted": str(len(expected)),
        "ours flagged": f"{len(ours)}" + (" (exactly those)" if ours == expected else " (WRONG)"),
        "ours max effect, undrifted columns": f"{max(c.effect for c in undrifted):.4f}",
        "whylogs p<0.05 flagged": f"{len(whylogs_flags)} ({false_whylogs} false)",
        "scipy p<0.05 flagged": f"{len(scipy_flags)} ({false_scipy} false)",
    }


def markdown(rows: list[dict[str, str]]) -> list[str]:
    """A markdown table of rows with the same keys."""
    header = list(rows[0])
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row[key] for key in header) + " |" for row in rows),
    ]


def main() -> int:
    """Run the benchmark; exit status 1 when a decision is wrong."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per profile")
    parser.add_argument("--window-rows", type=int, default=10_000, help="small drifted batch")
    parser.add_argument("--repeats", type=int, default=3, help="profile_frame_fast repeats")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    started = time.monotonic()
    n = args.rows

    print(f"generating 3 tables of {n:,} rows and one of {args.window_rows:,} ...", flush=True)
    reference = loans_table(n, seed=1)
    control = loans_table(n, seed=2)
    drifted = loans_table(n, seed=3, drifted=True)
    window = loans_table(args.window_rows, seed=4, drifted=True)
    spec = infer_feature_spec(reference, TARGET)
    print(f"{reference.shape[1]} columns: {dict(reference.dtypes.astype(str).value_counts())}")

    # Throughput, both profilers, both formats.
    throughput = []
    coerce_seconds = None
    views: dict[str, DatasetProfileView] = {}
    for label, prepare in (("raw dtypes", None), ("platform dtypes", platform_dtypes)):
        if prepare is None:
            frame = reference
        else:
            frame, seconds = timed(prepare, reference, spec)
            coerce_seconds = seconds[0]
        print(f"profiling {label} ...", flush=True)
        fast_view, fast_s = timed(profile_frame_fast, frame, repeats=args.repeats)
        why_view, why_s = timed(whylogs_profile, frame)
        same = profiles_agree(fast_view, why_view)
        views[label] = fast_view
        if prepare is not None:
            views["why platform dtypes"] = why_view
        fast_median = statistics.median(fast_s)
        met = n / fast_median >= THROUGHPUT_TARGET
        throughput.append(
            {
                "format": label,
                "why.log s": f"{why_s[0]:.1f}",
                "why.log rows/s": f"{n / why_s[0]:,.0f}",
                "profile_frame_fast s (median)": f"{fast_median:.1f}",
                "profile_frame_fast rows/s": f"{n / fast_median:,.0f}",
                "speed-up": f"{why_s[0] / fast_median:.1f}x",
                "target >= 150k rows/s": "met" if met else "NOT met",
                "same counts/types/items": "yes" if same else "NO",
            }
        )

    print("profiling the control and drifted batches ...", flush=True)
    reference_view = views["platform dtypes"]
    control_frame = platform_dtypes(control, spec)
    control_view = profile_frame_fast(control_frame)
    control_why = whylogs_profile(control_frame)
    drifted_frame = platform_dtypes(drifted, spec)
    drifted_view = profile_frame_fast(drifted_frame)
    window_frame = platform_dtypes(window, spec)
    window_view = profile_frame_fast(window_frame)
    reference_frame = platform_dtypes(reference, spec)

    # Decision time.
    control_result, decide_s = timed(compare_profiles, reference_view, control_view, repeats=5)
    drifted_result, drifted_s = timed(compare_profiles, reference_view, drifted_view, repeats=5)
    window_result = compare_profiles(reference_view, window_view)
    kinds = {c.column: c.kind for c in control_result.columns}
    p_value_s = informational_p_value_seconds(control_result)

    # Decision quality.
    whylogs_control = whylogs_default_flags(views["why platform dtypes"], control_why)
    whylogs_control_fast = whylogs_default_flags(reference_view, control_view)
    quality = [
        quality_row(
            f"control {n:,} vs {n:,} (whylogs on why.log profiles)",
            control_result,
            whylogs_control,
            exact_flags(reference_frame, control_frame, kinds),
            set(),
        ),
        quality_row(
            f"control {n:,} vs {n:,} (whylogs on profile_frame_fast profiles)",
            control_result,
            whylogs_control_fast,
            exact_flags(reference_frame, control_frame, kinds),
            set(),
        ),
        quality_row(
            f"drifted batch {n:,} rows",
            drifted_result,
            whylogs_default_flags(reference_view, drifted_view),
            exact_flags(reference_frame, drifted_frame, kinds),
            set(DRIFTED),
        ),
        quality_row(
            f"drifted window {args.window_rows:,} rows",
            window_result,
            whylogs_default_flags(reference_view, window_view),
            exact_flags(reference_frame, window_frame, kinds),
            set(DRIFTED),
        ),
    ]
    numeric = [name for name, kind in kinds.items() if kind == "numeric"]
    categorical = [name for name, kind in kinds.items() if kind == "categorical"]
    details = {
        "whylogs false flags on the control (why.log profiles)": sorted(whylogs_control),
        "whylogs false flags on the control (fast profiles)": sorted(whylogs_control_fast),
        "ours on the control": control_result.summary(),
        "ours on the drifted batch": drifted_result.summary(),
        "ours on the window": window_result.summary(),
    }
    correct = (
        not control_result.drifted_columns
        and set(drifted_result.drifted_columns) == set(DRIFTED)
        and set(window_result.drifted_columns) == set(DRIFTED)
    )
    decision = {
        "compare_profiles (control) ms, median of 5": f"{1000 * statistics.median(decide_s):.0f}",
        "compare_profiles (drifted) ms, median of 5": f"{1000 * statistics.median(drifted_s):.0f}",
        "of which the informational KS p-values (scipy kstwo.sf) ms": f"{1000 * p_value_s:.0f}",
        "columns": f"{len(kinds)} ({len(numeric)} numeric, {len(categorical)} categorical)",
        "coercion to platform dtypes s": f"{coerce_seconds:.1f}",
    }
    elapsed = time.monotonic() - started
    lines = report(args, throughput, decision, quality, details, elapsed, correct)
    print("\n".join(lines))
    if not args.no_record:
        with RESULTS.open("a") as handle:
            handle.write("\n".join(lines) + "\n")
    return 0 if correct else 1


def informational_p_value_seconds(result: DriftResult) -> float:
    """Seconds ``compare_profiles`` spends on the KS p-values it reports (they decide nothing)."""
    started = time.perf_counter()
    for column in result.columns:
        if column.test == "ks":
            n_eff = column.reference_rows * column.current_rows
            n_eff /= column.reference_rows + column.current_rows
            stats.kstwo.sf(column.ks_statistic, round(n_eff) or 1)
    return time.perf_counter() - started


def profiles_agree(fast: DatasetProfileView, reference: DatasetProfileView) -> bool:
    """Whether two profiles have the same exact metrics (all but the randomised KLL quantiles)."""
    exact = [
        "counts/n",
        "counts/null",
        "counts/nan",
        "types/integral",
        "types/fractional",
        "types/boolean",
        "types/string",
        "types/object",
    ]
    left, right = fast.to_pandas().sort_index(), reference.to_pandas().sort_index()
    if list(left.index) != list(right.index):
        return False
    columns = [c for c in exact if c in left and c in right]
    same = left[columns].astype(str).equals(right[columns].astype(str))
    items = all(
        _items(fast.get_column(name)) == _items(reference.get_column(name))
        for name in left.index
        if column_kind(reference.get_column(name)) == "categorical"
    )
    return same and items


def _items(column) -> list:
    metric = column.get_metric("frequent_items")
    return sorted((x.value, x.est) for x in metric.to_summary_dict()["frequent_strings"])


def report(
    args: argparse.Namespace,
    throughput: list[dict[str, str]],
    decision: dict[str, str],
    quality: list[dict[str, str]],
    details: dict[str, object],
    elapsed: float,
    correct: bool,
) -> list[str]:
    """The markdown section for RESULTS.md."""
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("whylogs", "pandas", "numpy", "scipy")
    )
    load = os.getloadavg()[0]
    return [
        "",
        f"### Drift profiling and decisions ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python benchmarks/drift.py --rows {args.rows} --window-rows {args.window_rows} "
        f"--repeats {args.repeats}`; machine: {os.cpu_count()} cores (load average {load:.1f} "
        f"at the end), Python {platform.python_version()}, {versions}. Table: {args.rows:,} rows "
        "x 22 columns (generate_loans + 7 columns: floats, integers, 5 categorical up to 50 "
        "values, 2 booleans, missing values). Benchmark wall time "
        f"{elapsed / 60:.1f} min.",
        "",
        "Profiling throughput (reference table):",
        "",
        *markdown(throughput),
        "",
        f"Drift decision on the {args.rows:,}-row profiles: "
        + "; ".join(f"{key}: {value}" for key, value in decision.items())
        + ".",
        "",
        "Decision quality (ours: effect size KS D / Hellinger > 0.1; whylogs: its default KS / "
        "chi-square p-value < 0.05 from the sketches; scipy: ks_2samp / chi-square on the raw "
        f"values). Truly drifted: {', '.join(DRIFTED)}. "
        + ("All decisions correct." if correct else "**A decision was wrong.**"),
        "",
        *markdown(quality),
        "",
        *(f"- {key}: {value}" for key, value in details.items()),
    ]


if __name__ == "__main__":
    sys.exit(main())
