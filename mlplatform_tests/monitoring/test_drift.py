"""Drift per column from whylogs profiles: known shifts flagged, noise not, the verdict's table
and picture."""

import subprocess
import sys
from typing import get_args

import numpy as np
import pytest
from scipy import stats

from mlplatform.demo.data import generate_loans
from mlplatform.model.spec import infer_feature_spec
from mlplatform.monitoring.drift import (
    ColumnDrift,
    DriftResult,
    DriftTest,
    DriftThresholds,
    column_kind,
    compare_profiles,
    plot_drift,
    sketch_ks_statistic,
)
from mlplatform.monitoring.profiles import profile_frame, profile_frame_fast
from mlplatform_tests.monitoring.synthetic import CATEGORICAL, NUMERIC, traffic
from mlplatform_tests.support import Picture

CONTROL_ROWS = 300_000
SHIFTED = ["normal_1", "lognormal_2", "poisson_1", "rounded_2"]
REMIXED = ["colour", "segment"]


def whylogs_ks_p_value(target, reference) -> float:
    """whylogs' own KS p-value for two KLL sketches (the default of its drift report).

    A faithful copy of ``whylogs.viz.utils.drift_calculations._compute_ks_test_p_value`` (1.6.4):
    both CDFs evaluated at 100 evenly spaced quantiles of each sketch, then ``kstwo``. The
    ``whylogs.viz`` package itself cannot be imported without IPython.
    """
    quantiles = list(np.linspace(0, 1, 100))
    points = sorted(set(target.get_quantiles(quantiles)) | set(reference.get_quantiles(quantiles)))
    gap = max(
        abs(t - r)
        for t, r in zip(target.get_cdf(points)[:-1], reference.get_cdf(points)[:-1], strict=True)
    )
    m, n = sorted([target.get_n(), reference.get_n()], reverse=True)
    return float(stats.distributions.kstwo.sf(gap, np.round(m * n / (m + n))))


def kll(view, column: str):
    return view.get_column(column).get_metric("distribution").kll.value


@pytest.fixture(scope="module")
def control():
    """Two independent large samples of the same distribution and their profiles."""
    reference = traffic(CONTROL_ROWS, seed=1)
    current = traffic(CONTROL_ROWS, seed=2)
    return reference, current, profile_frame_fast(reference), profile_frame_fast(current)


@pytest.fixture(scope="module")
def drifted_batch():
    frame = traffic(50_000, seed=3, shifted=SHIFTED, remixed=REMIXED)
    return frame, profile_frame_fast(frame)


def test_large_undrifted_control_flags_nothing_where_whylogs_p_values_do(control):
    reference, current, reference_view, current_view = control

    result = compare_profiles(reference_view, current_view)

    assert result.rows == CONTROL_ROWS
    assert len(result.columns) == len(NUMERIC) + 1 + len(CATEGORICAL)
    assert all(c.decided for c in result.columns)
    assert result.drifted_columns == []
    assert max(c.effect for c in result.columns) < 0.02  # the bound is 0.1
    assert not result.should_retrain
    # The same sketches judged by whylogs' KS p-value at its 0.05 drift threshold. At 300k rows
    # the sketch's rank error (about 0.003 per sketch) rivals the KS critical value (about
    # 0.0035), so undrifted columns get flagged: 2 to 10 of these 24 (6 on average) in 300 runs
    # (KLL sketches are randomised), where the exact test on the raw data flags 1.
    whylogs_flags = [
        name
        for name in NUMERIC
        if whylogs_ks_p_value(kll(current_view, name), kll(reference_view, name)) < 0.05
    ]
    exact_flags = [
        name
        for name in NUMERIC
        if stats.ks_2samp(reference[name].dropna(), current[name].dropna()).pvalue < 0.05
    ]
    assert len(exact_flags) <= 1
    assert len(whylogs_flags) >= 1


def test_known_drift_flags_exactly_the_changed_columns(control, drifted_batch):
    _, _, reference_view, _ = control
    _, current_view = drifted_batch

    result = compare_profiles(reference_view, current_view)

    assert sorted(result.drifted_columns) == sorted(SHIFTED + REMIXED)
    by_name = {c.column: c for c in result.columns}
    for name in SHIFTED:
        assert by_name[name].kind == "numeric" and by_name[name].test == "ks"
        assert by_name[name].ks_statistic > 0.15
        assert by_name[name].p_value < 1e-6
    for name in REMIXED:
        assert by_name[name].kind == "categorical" and by_name[name].test == "chi-square"
        assert by_name[name].hellinger > 0.15
    assert by_name["city"].kind == "categorical" and not by_name["city"].drifted
    assert result.drifted_share == pytest.approx(6 / 29)
    assert not result.should_retrain  # 21% < 30%
    assert compare_profiles(
        reference_view, current_view, DriftThresholds(drifted_share=0.2)
    ).should_retrain
    # Restricting and excluding columns.
    only = compare_profiles(reference_view, current_view, columns=["normal_1", "plan"])
    assert [c.column for c in only.columns] == ["normal_1", "plan"]
    assert only.drifted_columns == ["normal_1"]
    without = compare_profiles(reference_view, current_view, exclude=SHIFTED)
    assert sorted(without.drifted_columns) == sorted(REMIXED)
    with pytest.raises(KeyError, match="nonexistent"):
        compare_profiles(reference_view, current_view, columns=["nonexistent"])


def test_sketch_ks_statistic_matches_scipy_on_raw_data(control, drifted_batch):
    reference, current, reference_view, current_view = control
    drifted, drifted_view = drifted_batch

    gaps = []
    for frame, view in ((current, current_view), (drifted, drifted_view)):
        for name in [*NUMERIC, "flag"]:
            exact = stats.ks_2samp(reference[name].dropna(), frame[name].dropna()).statistic
            estimate = sketch_ks_statistic(kll(reference_view, name), kll(view, name))
            gaps.append(abs(estimate - exact))
    assert max(gaps) < 0.02
    assert np.mean(gaps) < 0.005


def test_too_few_rows_gives_no_decision(control):
    _, _, reference_view, _ = control
    small = traffic(300, seed=4, shifted=SHIFTED, remixed=REMIXED)

    result = compare_profiles(reference_view, profile_frame_fast(small))

    assert not any(c.decided or c.drifted for c in result.columns)
    assert all(c.reason.startswith("insufficient data: ") for c in result.columns)
    assert all(c.reason.endswith("rows, 500 needed") for c in result.columns)
    assert not result.enough_rows and not result.should_retrain
    assert result.summary().startswith("No retrain: the window has 300 rows")


def test_small_windows_catch_clear_shifts_and_raise_no_false_alarm(control):
    """At 300 rows noise alone reaches KS 0.11: shifts of D >= 0.2 still clear it."""
    _, _, reference_view, _ = control
    small = traffic(300, seed=4, shifted=SHIFTED, remixed=REMIXED)

    result = compare_profiles(
        reference_view, profile_frame_fast(small), DriftThresholds(min_rows=200)
    )
    by_name = {c.column: c for c in result.columns}

    assert set(SHIFTED) <= set(result.drifted_columns)
    assert "colour" in result.drifted_columns  # 3 categories: shares reversed
    assert set(result.drifted_columns) <= set(SHIFTED) | set(REMIXED)
    assert "noise level 0.11" in by_name["normal_1"].reason
    for name in set(NUMERIC) - set(SHIFTED):  # within the bound, or too close to noise to tell
        reason = by_name[name].reason
        assert reason.startswith(("KS", "undecided: KS")) and "> 0.1 and" not in reason, reason


def test_many_categories_raise_the_noise_level(control):
    """With 40 categories, noise alone reaches Hellinger 0.12 at 600 rows: no false alarm."""
    _, _, reference_view, _ = control
    window = traffic(600, seed=5)

    result = compare_profiles(reference_view, profile_frame_fast(window))
    by_name = {c.column: c for c in result.columns}

    assert by_name["colour"].decided
    assert not by_name["city"].drifted
    assert result.drifted_columns == []


def test_a_small_reference_still_detects_a_clear_shift_and_says_what_it_cannot_resolve():
    """400 training rows (a 569-row dataset): n_eff stays under 400 whatever the traffic."""
    reference = traffic(400, seed=6)
    shifted = traffic(6_000, seed=7, shifted=SHIFTED)
    shifted[SHIFTED] += 1.5 * shifted[SHIFTED].std()  # two standard deviations in all
    resample = traffic(6_000, seed=8)

    moved = compare_profiles(profile_frame_fast(reference), profile_frame_fast(shifted))
    quiet = compare_profiles(profile_frame_fast(reference), profile_frame_fast(resample))

    assert set(moved.drifted_columns) == set(SHIFTED)
    assert quiet.drifted_columns == []
    assert moved.reference_note == ""  # 400 rows resolve KS 0.1
    tiny = compare_profiles(profile_frame_fast(traffic(150, seed=9)), profile_frame_fast(shifted))
    assert "The reference has 150 rows" in tiny.summary()
    assert set(tiny.drifted_columns) == set(SHIFTED)


def column(name: str, decided: bool = True, drifted: bool = False) -> ColumnDrift:
    return ColumnDrift(
        column=name,
        kind="numeric",
        reference_rows=10_000,
        current_rows=1_000,
        ks_statistic=0.2 if drifted else 0.01,
        hellinger=0.1,
        p_value=0.001,
        test="ks",
        decided=decided,
        drifted=drifted,
        reason="",
    )


@pytest.mark.parametrize(
    ("drifted", "undecided", "rows", "retrain"),
    [
        (3, 0, 1_000, True),  # 3 of 10 = 30% reaches the 30% threshold
        (2, 0, 1_000, False),  # 20%
        (2, 3, 1_000, False),  # 2 of the 7 decided columns: 29%
        (3, 3, 1_000, True),  # undecided columns do not dilute the share: 3 of 7
        (0, 0, 1_000, False),
        (5, 0, 499, False),  # below min_rows nothing fires
    ],
)
def test_should_retrain_threshold(drifted, undecided, rows, retrain):
    columns = [column(f"d{i}", drifted=True) for i in range(drifted)]
    columns += [column(f"u{i}", decided=False) for i in range(undecided)]
    columns += [column(f"k{i}") for i in range(10 - drifted - undecided)]
    result = DriftResult(tuple(columns), rows, 10_000, DriftThresholds())

    assert result.drifted_share == pytest.approx(drifted / (10 - undecided))
    assert result.should_retrain is retrain
    assert result.summary().startswith("Retrain" if retrain else "No retrain")
    if rows >= 500 and drifted:
        assert f"{drifted} of {10 - undecided} columns drifted" in result.summary()


def test_column_kinds_and_type_change(control):
    _, _, reference_view, _ = control
    assert column_kind(reference_view.get_column("normal_1")) == "numeric"
    assert column_kind(reference_view.get_column("flag")) == "numeric"
    assert column_kind(reference_view.get_column("colour")) == "categorical"

    changed = traffic(1_000, seed=8)
    changed["normal_1"] = changed["normal_1"].round().astype(int).astype(str)
    result = compare_profiles(reference_view, profile_frame_fast(changed))
    by_name = {c.column: c for c in result.columns}

    assert by_name["normal_1"].test == "type"
    assert {c.test for c in result.columns} == {"ks", "chi-square", "type"}
    assert {c.test for c in result.columns} <= set(get_args(DriftTest))
    assert by_name["normal_1"].drifted
    assert "string" in by_name["normal_1"].reason
    assert result.drifted_columns == ["normal_1"]


def test_bounds_must_exceed_the_sketch_error(control):
    _, _, reference_view, current_view = control
    with pytest.raises(ValueError, match="rank error"):
        compare_profiles(reference_view, current_view, DriftThresholds(ks_bound=0.004))
    with pytest.raises(ValueError, match="min_rows"):
        DriftThresholds(min_rows=0)
    with pytest.raises(ValueError, match="ks_bound"):
        DriftThresholds(ks_bound=0.0)


def test_demo_loans_profiled_like_the_reference():
    """The real reference format (profile_frame): drift=1 moves every feature but purpose, region
    and has_cosigner, and an undrifted sample of the same size moves none."""
    train = generate_loans(20_000, seed=1)
    spec = infer_feature_spec(train, "defaulted", "application_date")
    reference = profile_frame(train, spec)
    moved = generate_loans(20_000, seed=2, drift=1.0).drop(columns=["defaulted"])
    same = generate_loans(20_000, seed=3).drop(columns=["defaulted"])

    drifted = compare_profiles(reference, profile_frame(moved, spec), exclude=["application_date"])
    undrifted = compare_profiles(reference, profile_frame(same, spec), exclude=["application_date"])

    unchanged = {"purpose", "region", "has_cosigner"}
    assert set(drifted.drifted_columns) == set(spec.features) - unchanged - {"application_date"}
    assert drifted.should_retrain
    assert "defaulted" not in [c.column for c in drifted.columns]  # the target is not in traffic
    assert undrifted.drifted_columns == []
    assert not undrifted.should_retrain


def test_table_and_plot(control, drifted_batch):
    _, _, reference_view, current_view = control
    result = compare_profiles(reference_view, drifted_batch[1])

    table = result.to_frame()
    assert len(table) == len(result.columns)
    assert set(table.loc[table["drifted"], "column"]) == set(SHIFTED + REMIXED)
    assert (table.loc[table["kind"] == "numeric", "bound"] == 0.1).all()
    assert (table["effect"] > table["bound"]).equals(table["drifted"])
    png = plot_drift(result)
    assert png.startswith(b"\x89PNG")
    assert len(png) > 5_000
    # One red bar per drifted column, top to bottom in the table's order, as long as its effect
    # (the legend's red patch is narrower than any of them).
    picture = Picture.of(png)
    red_bars = Picture.bars(picture.where("tab:red"), min_width=60)
    effects = table.loc[table["drifted"], "effect"].to_numpy()
    assert len(red_bars) == len(effects) == 6
    assert np.array(red_bars) / effects == pytest.approx(red_bars[0] / effects[0], rel=0.05)
    # Without drift: no red bar, every column's bar within its bound, in blue.
    calm = Picture.of(plot_drift(compare_profiles(reference_view, current_view)))
    assert Picture.bars(calm.where("tab:red"), min_width=60) == []
    assert calm.where("tab:blue").sum() > picture.where("tab:blue").sum()


def test_drift_module_imports_neither_dagster_nor_ray():
    code = (
        "import sys, mlplatform.monitoring.drift; "
        "assert not {'dagster', 'ray'} & set(sys.modules), 'dagster or ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
