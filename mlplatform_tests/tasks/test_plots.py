"""The evaluation report's pictures, decoded and checked for what they show (a blank figure fails).

The checks go by the curves' colours and where they fall inside the axes frame: robust to fonts,
antialiasing and layout, with no reference images to keep up to date.
"""

import numpy as np
import pandas as pd
import pytest

from mlplatform.tasks.plots import (
    plot_calibration,
    plot_confusion_matrix,
    plot_feature_importance,
    plot_precision_recall,
    plot_roc,
)
from mlplatform_tests.support import PNG_SIGNATURE, Picture, scored

# Where a line at y = 1 falls in the frame of a curve plot (whose y axis ends at 1.02).
TOP_BAND = (0.95, 1.0)


def separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, probabilities that rank every positive above every negative, and coin flips."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    perfect = np.where(labels == 1, 0.6 + 0.4 * rng.random(n), 0.4 * rng.random(n))
    return labels, perfect, rng.random(n)


def test_plots_return_png_bytes():
    labels, probability = scored(300, seed=12)
    curves = {"challenger": probability, "champion": np.sqrt(probability)}
    importance = pd.Series({"credit_score": 3.0, "income": 1.0, "region": 0.2}, name="gain")
    images = [
        plot_roc(labels, curves),
        plot_precision_recall(labels, curves),
        plot_calibration(labels, curves, n_bins=8),
        plot_confusion_matrix(labels, probability >= 0.3, ("repaid", "defaulted")),
        plot_feature_importance(importance, top=2),
        plot_roc(np.zeros(5, int), {"m": np.linspace(0, 1, 5)}),  # one class: still a picture
    ]
    for image in images:
        assert isinstance(image, bytes) and image.startswith(PNG_SIGNATURE)
        assert len(image) > 1000
        assert Picture.of(image).colour_count() > 20  # a figure, not one flat colour
    # Other inputs, another picture.
    other_labels, other = scored(300, seed=13)
    redrawn = plot_roc(other_labels, {"challenger": other, "champion": np.sqrt(other)})
    assert not np.array_equal(Picture.of(redrawn).pixels, Picture.of(images[0]).pixels)


def test_roc_of_a_perfect_model_hugs_the_top_and_a_random_one_the_diagonal():
    labels, perfect, coin = separable(400, seed=1)

    sharp = Picture.of(plot_roc(labels, {"perfect": perfect}))
    blind = Picture.of(plot_roc(labels, {"random": coin}))

    sharp_curve, blind_curve = sharp.where("C0"), blind.where("C0")
    assert sharp_curve.sum() > 300 and blind_curve.sum() > 300
    # The perfect curve runs up the left edge (under the frame) and along TPR 1: nothing of it in
    # the middle of the plot. The random one crosses the middle, close to the diagonal.
    middle = {"x": (0.2, 0.8), "y": (0.2, 0.8)}
    assert sharp.share(sharp_curve, **middle) == 0.0
    assert sharp.share(sharp_curve, y=TOP_BAND) > 0.8
    assert blind.share(blind_curve, **middle) > 0.4
    assert blind.share(blind_curve, y=TOP_BAND) < 0.1
    # The chance diagonal is drawn in grey on both (the only grey in the middle: no grid).
    for picture in (sharp, blind):
        assert (picture.where("grey", 0.1) & picture.window(**middle)).sum() > 50


def test_roc_with_one_class_draws_no_curve():
    picture = Picture.of(plot_roc(np.zeros(50, int), {"m": np.linspace(0, 1, 50)}))

    assert not picture.where("C0").any()  # the note stands in for the curve
    # The chance line is still drawn (away from the note in the middle).
    assert (picture.where("grey", 0.1) & picture.window(x=(0.05, 0.3), y=(0.05, 0.3))).sum() > 20


def test_precision_recall_of_a_perfect_model_stays_at_one_and_a_random_one_at_the_base_rate():
    labels, perfect, coin = separable(400, seed=2)

    picture = Picture.of(plot_precision_recall(labels, {"perfect": perfect, "random": coin}))

    sharp, blind = picture.where("C0"), picture.where("C1")
    assert sharp.sum() > 300 and blind.sum() > 300
    # Precision 1 at every recall, then the drop at recall 1: nothing in the middle (below the
    # legend, which is in the upper right).
    assert picture.share(sharp, y=TOP_BAND) > 0.5
    assert picture.share(sharp, x=(0.1, 0.9), y=(0.1, 0.75)) == 0.0
    # The random model's precision hovers around the base rate (drawn as the grey line).
    base_rate = labels.mean()
    around_base_rate = (base_rate - 0.15, base_rate + 0.15)
    assert picture.share(blind, y=around_base_rate) > 0.4
    assert picture.share(blind, y=TOP_BAND) < 0.1
    base_rate_line = picture.where("grey", 0.1) & picture.window(x=(0.1, 0.6), y=around_base_rate)
    assert base_rate_line.sum() > 30


def test_calibration_curves_follow_the_observed_rate():
    rng = np.random.default_rng(3)
    probability = rng.random(2000)
    labels = (rng.random(2000) < probability).astype(int)  # calibrated by construction

    picture = Picture.of(
        plot_calibration(labels, {"calibrated": probability, "inverted": 1 - probability})
    )

    # High predicted probabilities with a low observed rate: the inverted model's corner only.
    overconfident = {"x": (0.6, 1.0), "y": (0.0, 0.4)}
    assert picture.share(picture.where("C0"), **overconfident) == 0.0
    assert picture.share(picture.where("C1"), **overconfident) > 0.25
    assert picture.where("C0").sum() > 200 and picture.where("C1").sum() > 200


def test_confusion_matrix_is_dark_where_the_counts_are():
    labels = np.repeat([0, 1], 50)
    right = Picture.of(plot_confusion_matrix(labels, labels, ("no", "yes")))
    wrong = Picture.of(plot_confusion_matrix(labels, 1 - labels, ("no", "yes")))
    darkest = "#08306b"  # the top of the Blues colour map: the cells holding all 50 rows

    # The colour bar is the same on both pictures; the cells differ.
    right_cells = right.where(darkest, 0.1) & ~wrong.where(darkest, 0.1)
    wrong_cells = wrong.where(darkest, 0.1) & ~right.where(darkest, 0.1)
    assert right_cells.sum() > 5000 and wrong_cells.sum() > 5000

    def slope(cells: np.ndarray) -> float:
        """Correlation of row and column: 0.75 for two squares on the diagonal, -0.75 across."""
        rows, columns = np.nonzero(cells)
        return float(np.corrcoef(rows, columns)[0, 1])

    assert slope(right_cells) > 0.6  # correct predictions: top left and bottom right
    assert slope(wrong_cells) < -0.6


def test_feature_importance_bars_are_in_proportion_largest_first():
    importance = pd.Series({"income": 1.0, "credit_score": 3.0, "region": 0.2}, name="gain")

    bars = Picture.of(plot_feature_importance(importance, top=2)).where("tab:blue")

    widths = Picture.bars(bars)
    assert len(widths) == 2  # top=2: region is left out
    assert widths[0] / widths[1] == pytest.approx(3.0, rel=0.03)  # credit_score first
