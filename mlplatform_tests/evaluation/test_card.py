"""The model card: every section, the problems flagged, and missing values survived."""

from mlplatform.evaluation.card import render_model_card
from mlplatform.tasks.metrics import bootstrap_metrics
from mlplatform.tasks.slices import slice_metrics
from mlplatform_tests.support import scored


def test_model_card_has_every_section_and_flags_problems(sliced):
    frame, labels, probability = sliced
    slices = slice_metrics(frame, labels, probability, 0.5, ["region"], min_rows=4)
    intervals = bootstrap_metrics(*scored(400, seed=13), threshold=0.3, n_resamples=100)
    card = {
        "model_name": "loan-default",
        "model_version": "7",
        "task": "binary classification",
        "intended_use": "Rank applications for manual review.",
        "training_data": {
            "source": "loans.csv",
            "data_version": "abc123",
            "rows": 5000,
            "time_range": None,
            "class_balance": {"0": 0.85, "1": 0.15},
        },
        "features": {"credit_score": "numeric", "region": "categorical"},
        "dropped": {"application_id": "identifier-like"},
        "threshold": 0.31,
        "metrics": {name: interval.as_dict() for name, interval in intervals.items()},
        "champion_comparison": None,
        "slices": slices.to_dict("records"),
        "fairness_gaps": {"region": 0.5, "term": 0.01},
        "fairness_bound": 0.1,
        "limitations": ["Trained on synthetic data."],
        "lineage": {"dagster_run_id": "run-1", "mlflow_run_id": "ml-1", "code_version": "0.1.0"},
    }
    text = render_model_card(card)
    for heading in (
        "# Model card: loan-default v7",
        "## Intended use",
        "## Training data",
        "## Features",
        "## Metrics",
        "## Slices and fairness",
        "## Known limitations",
        "## Lineage",
    ):
        assert heading in text
    assert "95% interval" in text
    roc = intervals["roc_auc"]
    assert f"| roc_auc | {roc.point:.4f} | [{roc.low:.4f}, {roc.high:.4f}]" in text
    assert "| region | 0.5000 | **EXCEEDS BOUND** |" in text
    assert "| term | 0.0100 | within bound |" in text
    limitations = text.split("## Known limitations")[1].split("## Lineage")[0]
    assert "Trained on synthetic data." in limitations
    assert "region = b" in limitations and "region = <missing>" in limitations
    assert "region = a" not in limitations
    assert "fairness gap of 0.500" in limitations
    assert "**Time range:** n/a" in text
    assert "**Against the champion:** n/a" in text
    assert "**Git commit:** n/a" in text
    assert "application_id" in text and "15.0%" in text


def test_model_card_survives_missing_values():
    text = render_model_card({"metrics": {"roc_auc": {"point": None}}, "slices": None})
    assert "# Model card: n/a vn/a" in text
    assert "| roc_auc | n/a | n/a |" in text
    assert "None recorded." in text
    assert render_model_card({}).count("## ") == 7
