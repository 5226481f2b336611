"""The platform's single entry point: every asset, check, job and resource."""

import dagster as dg

from mlplatform.defs.evaluation import evaluation_report
from mlplatform.defs.features import features, reference_profile
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.registry import champion_model
from mlplatform.defs.serving import model_endpoint
from mlplatform.defs.training import candidate_model
from mlplatform.resources import DataSource, MlflowTracking, RayServe

ASSETS = [
    raw_data,
    features,
    reference_profile,
    candidate_model,
    evaluation_report,
    champion_model,
    model_endpoint,
]

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.assets(raw_data).downstream(),
    description="Ingest, train, evaluate, promote through the gate and redeploy the endpoint.",
)

rollback_job = dg.define_asset_job(
    "rollback_job",
    selection=dg.AssetSelection.assets(champion_model, model_endpoint),
    config={"ops": {"champion_model": {"config": {"action": "rollback"}}}},
    description="Point `champion` back at an earlier version (set `version` and `reason`) "
    "and redeploy the endpoint.",
)

defs = dg.Definitions(
    assets=ASSETS,
    jobs=[retrain_job, rollback_job],
    resources={
        "data_source": DataSource(),
        "mlflow_tracking": MlflowTracking(),
        "ray_serve": RayServe(),
    },
    # Steps share one process: the graph is a chain, and a process per step costs seconds each.
    executor=dg.in_process_executor,
)
