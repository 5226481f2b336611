"""The rollout demo's data, through the real pipeline: what the gate says offline, what live says.

v2 (this year's applicants) must pass the gate against v1 and be better on live traffic; v3 (an
export with the east region mislabelled) must pass the gate against v2 yet be worse live and
score the east region far off v2.
"""

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score

from mlplatform.defs.evaluation import evaluation_report
from mlplatform.defs.features import features
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.registry import champion_model
from mlplatform.defs.training import candidate_model
from mlplatform.demo.data import (
    ROLLOUT_EXTRACTS,
    ROLLOUT_LIVE_DRIFT,
    TARGET,
    generate_extract,
    write_extract,
)
from mlplatform.demo.simulate import traffic_records
from mlplatform.evaluation.gate import EvaluationReport
from mlplatform.model.pyfunc import TabularModel
from mlplatform.model.registry import CHAMPION_ALIAS, load_tabular_model
from mlplatform.monitoring.rollout import compare_scores
from mlplatform.resources import DataSource, MlflowTracking

TRAIN_AND_EVALUATE = [raw_data, features, candidate_model, evaluation_report]


def test_one_region_is_mislabelled_in_the_third_export_only():
    sound, broken = generate_extract(ROLLOUT_EXTRACTS[1]), generate_extract(ROLLOUT_EXTRACTS[2])
    assert sound.loc[sound["region"] == "east", TARGET].mean() < 0.5
    assert broken.loc[broken["region"] == "east", TARGET].eq(1).all()
    west = broken["region"] == "west"
    assert broken.loc[west, TARGET].mean() == pytest.approx(sound[TARGET].mean(), abs=0.06)


def test_write_extract_replaces_the_file(tmp_path):
    path = write_extract(tmp_path / "loans.csv", ROLLOUT_EXTRACTS[0])
    first = path.read_bytes()
    assert write_extract(path, ROLLOUT_EXTRACTS[1]).read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loans.csv"]


def _evaluate(instance: dg.DagsterInstance, resources: dict) -> EvaluationReport:
    result = dg.materialize(TRAIN_AND_EVALUATE, resources=resources, instance=instance)
    assert result.success
    return result.output_for_node("evaluation_report")


def test_gate_passes_v2_and_v3_and_only_live_tells_v3_apart(tmp_path, instance):
    source = tmp_path / "source" / "loans.csv"
    resources = {
        "data_source": DataSource(uri=str(source), target=TARGET),
        "mlflow_tracking": MlflowTracking(),
    }
    write_extract(source, ROLLOUT_EXTRACTS[0])
    first = dg.materialize(
        [*TRAIN_AND_EVALUATE, champion_model], resources=resources, instance=instance
    )
    assert first.success
    v1 = first.output_for_node("champion_model")

    write_extract(source, ROLLOUT_EXTRACTS[1])
    second = _evaluate(instance, resources)
    assert second.champion.version == v1.version
    assert second.gate.passed, second.gate.reason
    assert second.difference["roc_auc"]["point"] > 0  # better offline too
    # The rollout promotes it; the third export is then judged against it.
    MlflowClient().set_registered_model_alias(v1.name, CHAMPION_ALIAS, second.challenger.version)

    write_extract(source, ROLLOUT_EXTRACTS[2])
    third = _evaluate(instance, resources)
    assert third.champion.version == second.challenger.version
    assert third.gate.passed, third.gate.reason

    # Live: today's applicants with their true outcomes, as the traffic simulator sends them.
    records, labels = traffic_records(3000, ROLLOUT_LIVE_DRIFT, seed=100)
    models = [load_tabular_model(ref) for ref in (v1, second.challenger, third.challenger)]
    live = [model.scores(_frame(records, model)) for model in models]
    auc = [roc_auc_score(labels, scores) for scores in live]
    assert auc[1] > auc[0] + 0.03  # v2 is better than v1 live
    assert auc[2] < auc[1] - 0.03  # v3 is worse than v2 live

    def shadow(champion: int, challenger: int) -> float:
        decisions = [
            models[i].spec.strategy.predicted_classes(live[i], models[i].threshold)
            for i in (champion, challenger)
        ]
        return compare_scores(*decisions, live[champion], live[challenger]).score_shift

    # v3 scores the east region far off v2; v2's shift from v1 is the population's move.
    assert shadow(1, 2) > shadow(0, 1) + 0.05
    east = np.array([record["region"] == "east" for record in records])
    assert live[2][east].mean() > live[1][east].mean() + 0.3


def _frame(records: list[dict], model: TabularModel) -> pd.DataFrame:
    return pd.DataFrame.from_records(records)[list(model.spec.features)]
