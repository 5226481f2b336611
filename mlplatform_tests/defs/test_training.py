import dagster as dg
import mlflow
from mlflow import MlflowClient
from mlflow.models import Model

from mlplatform.defs.features import features
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.training import candidate_model
from mlplatform.model.registry import CHALLENGER_ALIAS
from mlplatform.model.training import select_best


def test_select_best_maximises_scores_and_minimises_losses():
    scores = {"a": {"roc_auc": 0.7, "log_loss": 0.5}, "b": {"roc_auc": 0.8, "log_loss": 0.6}}
    assert select_best(scores, "roc_auc") == "b"
    assert select_best(scores, "log_loss") == "a"


def test_candidate_model_is_logged_registered_and_tagged(training_resources, platform_home):
    result = dg.materialize([raw_data, features, candidate_model], resources=training_resources)
    assert result.success
    ref = result.output_for_node("candidate_model")
    client = MlflowClient()
    assert mlflow.get_tracking_uri().startswith(f"sqlite:///{platform_home}")
    version = client.get_model_version_by_alias(ref.name, CHALLENGER_ALIAS)
    assert str(version.version) == ref.version == "1"
    assert version.tags["dagster_run_id"] == result.run_id
    assert version.tags["data_version"] == result.output_for_node("features").data_version
    assert version.tags["algorithm"] in {"lightgbm", "sklearn_logistic"}
    run = client.get_run(ref.mlflow_run_id)
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert {"valid_roc_auc_lightgbm", "valid_roc_auc_sklearn_logistic", "valid_roc_auc"} <= set(
        run.data.metrics
    )
    artifact_uri = client.get_run(ref.mlflow_run_id).info.artifact_uri
    assert artifact_uri.startswith((platform_home / "mlflow" / "artifacts").as_uri())
    loaded = mlflow.pyfunc.load_model(ref.uri)
    assert loaded.metadata.signature is not None
    # The example MLflow keeps beside the model is the typical record, not rows of the data.
    local = mlflow.artifacts.download_artifacts(ref.uri)
    example = Model.load(local).load_input_example(local)
    typical = loaded.unwrap_python_model().example_record
    assert example.to_dict(orient="records") == [typical]
    train = result.output_for_node("features").inputs("train")
    assert not (train.astype(str) == example.astype(str).iloc[0]).all(axis=1).any()


def test_lightgbm_search_is_logged_as_nested_runs(training_resources):
    result = dg.materialize(
        [raw_data, features, candidate_model],
        resources=training_resources,
        run_config={"ops": {"candidate_model": {"config": {"tuning_trials": 4}}}},
    )
    assert result.success
    parent = result.output_for_node("candidate_model").mlflow_run_id
    trials = MlflowClient().search_runs(
        [MlflowClient().get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    assert len(trials) == 4
    assert all(0.5 < run.data.metrics["valid_roc_auc"] <= 1 for run in trials)
    assert {run.info.run_name for run in trials} == {f"lightgbm-trial-{n}" for n in range(4)}
