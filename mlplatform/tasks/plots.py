"""The evaluation report's pictures as PNG bytes, drawn without pyplot's global state."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from mlplatform.tasks.metrics import as_labels, as_probability, has_both_classes

_FIGURE_SIZE = (5.0, 4.0)
_DPI = 100
# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def new_figure(size: tuple[float, float] = _FIGURE_SIZE) -> Figure:
    """A matplotlib figure on the Agg canvas (no pyplot state, safe in worker threads)."""
    figure = Figure(figsize=size, dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def png(figure: Figure) -> bytes:
    """The figure, laid out tightly, as PNG bytes."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _one_class_note(axes: Any) -> None:
    axes.text(0.5, 0.5, "needs both classes", ha="center", va="center", transform=axes.transAxes)


def _curves_figure(
    labels: np.ndarray,
    curves: Mapping[str, np.ndarray],
    draw: Callable[[Any, np.ndarray, str, np.ndarray], None],
    baseline: Callable[[Any, np.ndarray], None],
    axes_settings: dict[str, Any],
    legend_loc: str,
    needs_both_classes: bool = True,
) -> bytes:
    """One figure with a reference line and one curve per model, as PNG bytes.

    Args:
        labels: true labels, 0/1 with 1 for the positive class.
        curves: model name -> its positive-class probabilities for the same rows.
        draw: draws one model's curve: ``draw(axes, labels, name, probability)``.
        baseline: draws the reference line: ``baseline(axes, labels)``.
        axes_settings: axis labels, title and limits.
        legend_loc: where the legend goes.
        needs_both_classes: with one class only, show a note instead of curves.

    """
    y = as_labels(labels)
    figure = new_figure()
    axes = figure.add_subplot()
    baseline(axes, y)
    if needs_both_classes and not has_both_classes(y):
        _one_class_note(axes)
    else:
        for name, probability in curves.items():
            draw(axes, y, name, as_probability(probability))
    axes.set(**axes_settings)
    axes.legend(loc=legend_loc, fontsize="small")
    return png(figure)


def _diagonal(label: str) -> Callable[[Any, np.ndarray], None]:
    def draw(axes: Any, _: np.ndarray) -> None:
        axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label=label)

    return draw


def plot_roc(labels: np.ndarray, curves: Mapping[str, np.ndarray]) -> bytes:
    """ROC curves, one per model, with each model's AUC in the legend (PNG bytes)."""

    def draw(axes: Any, y: np.ndarray, name: str, p: np.ndarray) -> None:
        fpr, tpr, _ = roc_curve(y, p)
        axes.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, p):.3f})")

    settings = {"xlabel": "False positive rate", "ylabel": "True positive rate"}
    settings |= {"title": "ROC curve", "xlim": (0, 1), "ylim": (0, 1.02)}
    return _curves_figure(labels, curves, draw, _diagonal("chance"), settings, "lower right")


def plot_precision_recall(labels: np.ndarray, curves: Mapping[str, np.ndarray]) -> bytes:
    """Precision-recall curves, one per model, average precision in the legend (PNG bytes)."""

    def base_rate(axes: Any, y: np.ndarray) -> None:
        rate = float(y.mean())
        axes.axhline(rate, linestyle="--", color="grey", linewidth=1, label=f"base rate {rate:.3f}")

    def draw(axes: Any, y: np.ndarray, name: str, p: np.ndarray) -> None:
        precision, recall, _ = precision_recall_curve(y, p)
        average = average_precision_score(y, p)
        axes.step(recall, precision, where="post", label=f"{name} (AP {average:.3f})")

    settings = {"xlabel": "Recall", "ylabel": "Precision", "title": "Precision-recall curve"}
    settings |= {"xlim": (0, 1), "ylim": (0, 1.02)}
    return _curves_figure(labels, curves, draw, base_rate, settings, "upper right")


def plot_calibration(
    labels: np.ndarray, curves: Mapping[str, np.ndarray], n_bins: int = 10
) -> bytes:
    """Reliability diagram: observed positive rate against mean predicted probability (PNG bytes).

    ``n_bins`` equal-width probability bins; empty bins are not drawn.
    """

    def draw(axes: Any, y: np.ndarray, name: str, p: np.ndarray) -> None:
        observed, predicted = calibration_curve(
            y, np.clip(p, 0.0, 1.0), n_bins=n_bins, strategy="uniform"
        )
        axes.plot(predicted, observed, marker="o", markersize=3, label=name)

    settings = {"xlabel": "Mean predicted probability", "ylabel": "Observed positive rate"}
    settings |= {"title": "Calibration", "xlim": (0, 1), "ylim": (0, 1)}
    return _curves_figure(
        labels,
        curves,
        draw,
        _diagonal("perfectly calibrated"),
        settings,
        "upper left",
        needs_both_classes=False,
    )


def plot_confusion_matrix(
    labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]
) -> bytes:
    """Confusion matrix with the count in every cell.

    Args:
        labels: true labels as class indices (0/1 for binary, 1 = the positive class).
        predicted: predicted class indices.
        class_names: display names of class 0, 1, ...

    Returns:
        The figure as PNG bytes.

    """
    ticks = list(range(len(class_names)))
    matrix = confusion_matrix(as_labels(labels), as_labels(predicted), labels=ticks)
    side = max(_FIGURE_SIZE[1], 1.5 + 0.45 * len(ticks))
    figure = new_figure((side + 1.0, side))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    middle = matrix.max() / 2 if matrix.size else 0
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(
            column,
            row,
            f"{count:,}",
            ha="center",
            va="center",
            color="white" if count > middle else "black",
        )
    names = [str(name) for name in class_names]
    axes.set_xticks(ticks, labels=names, rotation=45 if len(ticks) > 4 else 0)
    axes.set_yticks(ticks, labels=names)
    axes.set(xlabel="Predicted", ylabel="Actual", title="Confusion matrix")
    return png(figure)


def plot_feature_importance(importance: pd.Series, top: int = 20) -> bytes:
    """Horizontal bars of the ``top`` most important features, the largest at the top.

    Args:
        importance: feature -> importance (as from :func:`feature_importance`).
        top: how many features to show.

    Returns:
        The figure as PNG bytes.

    """
    shown = importance.sort_values(ascending=False, kind="stable").head(top)
    figure = new_figure((_FIGURE_SIZE[0], max(_FIGURE_SIZE[1], 1.0 + 0.22 * len(shown))))
    axes = figure.add_subplot()
    positions = np.arange(len(shown))
    axes.barh(positions, shown.to_numpy(dtype=float), color="tab:blue")
    axes.set_yticks(positions, labels=[str(name) for name in shown.index], fontsize="small")
    axes.invert_yaxis()
    title = f"Feature importance ({importance.name})" if importance.name else "Feature importance"
    axes.set(xlabel="Importance", title=title)
    return png(figure)


def plot_predicted_vs_actual(values: np.ndarray, curves: Mapping[str, np.ndarray]) -> bytes:
    """Scatter of predicted against true values per model, with the identity line (PNG)."""
    y = np.asarray(values, dtype=float)
    figure = new_figure()
    axes = figure.add_subplot()
    low, high = float(np.min(y)), float(np.max(y))
    axes.plot([low, high], [low, high], linestyle="--", color="grey", linewidth=1, label="ideal")
    for name, predicted in curves.items():
        axes.scatter(y, np.asarray(predicted, dtype=float), s=6, alpha=0.5, label=name)
    axes.set(xlabel="Actual", ylabel="Predicted", title="Predicted vs actual")
    axes.legend(loc="upper left", fontsize="small")
    return png(figure)


def plot_residuals(values: np.ndarray, curves: Mapping[str, np.ndarray], bins: int = 40) -> bytes:
    """Histogram of residuals (predicted - actual) per model (PNG)."""
    y = np.asarray(values, dtype=float)
    figure = new_figure()
    axes = figure.add_subplot()
    for name, predicted in curves.items():
        axes.hist(np.asarray(predicted, dtype=float) - y, bins=bins, alpha=0.5, label=name)
    axes.axvline(0, linestyle="--", color="grey", linewidth=1)
    axes.set(xlabel="Residual (predicted - actual)", ylabel="Rows", title="Residuals")
    axes.legend(loc="upper right", fontsize="small")
    return png(figure)
