"""The model card: a Markdown page that says what a model is, how good it is and where it fails."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from mlplatform.tasks.metrics import LOWER_IS_BETTER, NOT_AVAILABLE, Interval, is_number
from mlplatform.tasks.slices import SLICE_HEADERS, known_limitations

# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def _text(value: Any, digits: int = 4) -> str:
    """A value for Markdown: numbers rounded, missing values as ``n/a``, pipes escaped."""
    if value is None or isinstance(value, bool | np.bool_):
        return NOT_AVAILABLE if value is None else ("yes" if value else "no")
    if isinstance(value, float | np.floating):
        return f"{float(value):.{digits}f}" if math.isfinite(float(value)) else NOT_AVAILABLE
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}"
    text = str(value).strip()
    return text.replace("|", "\\|").replace("\n", " ") if text else NOT_AVAILABLE


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_text(cell) for cell in row) + " |" for row in rows]
    return lines


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _records(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, pd.DataFrame):
        return value.to_dict("records")
    if isinstance(value, list | tuple):
        return [record for record in value if isinstance(record, Mapping)]
    return []


def _interval_parts(value: Any) -> tuple[Any, Any, Any]:
    if isinstance(value, Interval):
        return value.point, value.low, value.high
    if isinstance(value, Mapping):
        return value.get("point"), value.get("low"), value.get("high")
    return value, None, None


def _percent(value: Any) -> str:
    return f"{float(value):.1%}" if is_number(value) else NOT_AVAILABLE


def render_model_card(card: dict) -> str:
    """A Markdown model card from a plain dictionary; missing values render as ``n/a``.

    Args:
        card: keys ``model_name``, ``model_version``, ``task``, ``intended_use``,
            ``training_data`` (``source``, ``data_version``, ``rows``, ``time_range``,
            ``class_balance`` {label: share} or, for regression, ``target`` {statistic:
            value}), ``features`` {name: kind}, ``dropped``
            {name: reason}, ``threshold``, ``metrics`` {name: {point, low, high}},
            ``champion_comparison``, ``slices`` (records of :func:`slice_metrics`),
            ``fairness_gaps`` {feature: gap}, ``fairness_bound``, ``fairness_metric`` (the
            slice column the gaps compare, ``tpr`` by default), ``limitations`` (sentences)
            and ``lineage`` (``dagster_run_id``, ``mlflow_run_id``, ``code_version``,
            ``git_sha``). Every key is optional.

    Returns:
        The card: title, Intended use, Training data, Features, Metrics (with 95% intervals),
        Slices and fairness (features whose gap exceeds the bound flagged), Known limitations
        (the given ones plus every small slice and gap above the bound) and Lineage.

    """
    card = _mapping(card)
    name, version = _text(card.get("model_name")), _text(card.get("model_version"))
    lines = [f"# Model card: {name} v{version}", "", f"**Task:** {_text(card.get('task'))}", ""]

    lines += ["## Intended use", "", _text(card.get("intended_use")), ""]

    data = _mapping(card.get("training_data"))
    lines += [
        "## Training data",
        "",
        f"- **Source:** {_text(data.get('source'))}",
        f"- **Data version:** {_text(data.get('data_version'))}",
        f"- **Rows:** {_text(data.get('rows'))}",
        f"- **Time range:** {_text(data.get('time_range'))}",
    ]
    balance = _mapping(data.get("class_balance"))
    target = _mapping(data.get("target"))
    if target:
        summary = ", ".join(f"{name} {_text(value)}" for name, value in target.items())
        lines += [f"- **Target:** {summary}", ""]
    else:
        shares = ", ".join(f"{_text(label)}: {_percent(share)}" for label, share in balance.items())
        lines += [f"- **Class balance:** {shares or NOT_AVAILABLE}", ""]

    features = _mapping(card.get("features"))
    lines += ["## Features", ""]
    if features:
        lines += _table(["feature", "kind"], [[n, k] for n, k in features.items()])
    else:
        lines.append(NOT_AVAILABLE)
    dropped = _mapping(card.get("dropped"))
    if dropped:
        lines += ["", "Columns not used as features:", ""]
        lines += _table(["column", "reason"], [[n, r] for n, r in dropped.items()])
    lines.append("")

    metrics = _mapping(card.get("metrics"))
    lines += ["## Metrics", "", f"**Decision threshold:** {_text(card.get('threshold'))}", ""]
    if metrics:
        rows = []
        for metric, value in metrics.items():
            point, low, high = _interval_parts(value)
            interval = (
                f"[{_text(low)}, {_text(high)}]"
                if is_number(low) and is_number(high)
                else NOT_AVAILABLE
            )
            direction = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
            rows.append([metric, point, interval, direction])
        lines += _table(["metric", "value", "95% interval", "direction"], rows)
    else:
        lines.append(NOT_AVAILABLE)
    lines += ["", f"**Against the champion:** {_text(card.get('champion_comparison'))}", ""]

    slice_records = _records(card.get("slices"))
    gaps = {str(k): v for k, v in _mapping(card.get("fairness_gaps")).items()}
    bound = card.get("fairness_bound")
    lines += ["## Slices and fairness", ""]
    if slice_records:
        columns = list(slice_records[0])
        header = [SLICE_HEADERS.get(column, column.replace("_", " ")) for column in columns]
        lines += _table(header, [[record.get(c) for c in columns] for record in slice_records])
    else:
        lines.append("No slice metrics.")
    metric = _text(card.get("fairness_metric") or "tpr")
    lines += [
        "",
        f"**Fairness gap:** the largest difference in {metric} between a feature's slices "
        f"(small slices ignored); **bound:** {_text(bound)}",
        "",
        "**Declared sensitive (bounded by the promotion gate):** "
        + (", ".join(map(str, card.get("sensitive_features") or [])) or "none"),
        "",
    ]
    if gaps:
        rows = []
        for feature, gap in gaps.items():
            if not (is_number(gap) and is_number(bound)):
                status = NOT_AVAILABLE
            elif gap > bound:
                status = "**EXCEEDS BOUND**"
            else:
                status = "within bound"
            rows.append([feature, gap, status])
        lines += _table(["feature", "gap", "status"], rows)
    else:
        lines.append("No fairness gaps computed.")
    lines.append("")

    given = [str(item) for item in card.get("limitations") or [] if str(item).strip()]
    automatic = known_limitations(
        pd.DataFrame(slice_records),
        {k: float(v) for k, v in gaps.items() if is_number(v)},
        float(bound) if is_number(bound) else math.inf,
    )
    limitations = list(dict.fromkeys(given + automatic))
    lines += ["## Known limitations", ""]
    lines += [f"- {item}" for item in limitations] or ["None recorded."]
    lines.append("")

    lineage = _mapping(card.get("lineage"))
    lines += [
        "## Lineage",
        "",
        f"- **Dagster run:** {_text(lineage.get('dagster_run_id'))}",
        f"- **MLflow run:** {_text(lineage.get('mlflow_run_id'))}",
        f"- **Code version:** {_text(lineage.get('code_version'))}",
        f"- **Git commit:** {_text(lineage.get('git_sha'))}",
        "",
    ]
    return "\n".join(lines)
