"""Metrics per slice, fairness gaps and the limitations they imply, on hand-computed numbers."""

import math

import numpy as np
import pandas as pd
import pytest

from mlplatform.tasks.slices import fairness_gaps, known_limitations, slice_metrics


def test_slice_metrics_match_hand_computed_numbers(sliced):
    frame, labels, probability = sliced
    slices = slice_metrics(frame, labels, probability, 0.5, categorical=["region"], min_rows=4)
    assert list(slices.columns) == [
        "feature",
        "slice",
        "count",
        "positive_rate",
        "auc",
        "tpr",
        "fpr",
        "small",
    ]
    by_slice = slices.set_index("slice")
    assert by_slice["feature"].eq("region").all()
    assert by_slice["count"].to_dict() == {"a": 4, "b": 3, "<missing>": 1}
    assert by_slice.loc["a", "positive_rate"] == 0.5
    assert by_slice.loc["b", "positive_rate"] == pytest.approx(1 / 3)
    assert by_slice.loc["a", "tpr"] == 0.5 and by_slice.loc["a", "fpr"] == 0.5
    assert by_slice.loc["b", "tpr"] == 1.0 and by_slice.loc["b", "fpr"] == 0.0
    assert by_slice.loc["<missing>", "tpr"] == 0.0
    assert math.isnan(by_slice.loc["<missing>", "fpr"])  # no negatives
    assert math.isnan(by_slice.loc["<missing>", "auc"])  # one class
    # AUC in region a: positives {0.9, 0.2} vs negatives {0.8, 0.1}: 3 of 4 pairs ordered.
    assert by_slice.loc["a", "auc"] == 0.75
    assert by_slice.loc["b", "auc"] == 1.0
    assert by_slice["small"].to_dict() == {"a": False, "b": True, "<missing>": True}


def test_slice_metrics_bin_numeric_columns_by_quantile(sliced):
    frame, labels, probability = sliced
    slices = slice_metrics(frame, labels, probability, 0.5, [], numeric_bins={"amount": 2})
    assert slices["feature"].eq("amount").all()
    assert slices["slice"].tolist() == ["(0.999, 4.0]", "(4.0, 7.0]", "<missing>"]
    assert slices["count"].tolist() == [4, 3, 1]
    assert slices["small"].all()  # default min_rows=30
    constant = pd.DataFrame({"amount": [5.0] * 8})
    one_bin = slice_metrics(constant, labels, probability, 0.5, [], numeric_bins={"amount": 4})
    assert one_bin["count"].tolist() == [8]
    assert one_bin["slice"].tolist() == ["[5.0, 5.0]"]


def test_slice_metrics_rejects_unknown_columns(sliced):
    frame, labels, probability = sliced
    with pytest.raises(ValueError, match="colour"):
        slice_metrics(frame, labels, probability, 0.5, categorical=["colour"])


def test_fairness_gap_is_the_largest_difference_ignoring_small_slices():
    slices = pd.DataFrame(
        {
            "feature": ["region"] * 4 + ["term"] * 2 + ["purpose"] * 2,
            "slice": ["a", "b", "c", "tiny", "36", "60", "x", "y"],
            "count": [100, 80, 60, 5, 200, 150, 90, 3],
            "tpr": [0.70, 0.55, 0.62, 0.0, 0.6, np.nan, 0.5, 0.9],
            "small": [False, False, False, True, False, False, False, True],
        }
    )
    gaps = fairness_gaps(slices)
    assert gaps == {"region": pytest.approx(0.15)}  # term and purpose keep one usable slice
    assert fairness_gaps(slices, metric="count") == {
        "region": 40.0,
        "term": 50.0,
    }
    assert fairness_gaps(slices.iloc[0:0]) == {}


def test_known_limitations_name_small_slices_and_gaps_above_the_bound(sliced):
    frame, labels, probability = sliced
    slices = slice_metrics(frame, labels, probability, 0.5, ["region"], min_rows=4)
    sentences = known_limitations(slices, {"region": 0.3, "term": 0.05}, fairness_bound=0.1)
    assert len(sentences) == 3
    assert "region = b" in sentences[0] and "only 3 rows" in sentences[0]
    assert "region = <missing>" in sentences[1]
    assert "region" in sentences[2] and "0.300" in sentences[2] and "0.100" in sentences[2]
    assert known_limitations(pd.DataFrame(), {}, 0.1) == []
