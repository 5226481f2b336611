"""The evaluation report's pictures."""

import numpy as np
import pandas as pd

from mlplatform.tasks.plots import (
    plot_calibration,
    plot_confusion_matrix,
    plot_feature_importance,
    plot_precision_recall,
    plot_roc,
)
from mlplatform_tests.support import PNG_SIGNATURE, scored


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
