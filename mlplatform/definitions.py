"""The platform's single entry point: every asset, check, job, sensor and resource."""

import dagster as dg

from mlplatform.defs.evaluation import evaluation_report
from mlplatform.defs.features import features, reference_profile
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.monitoring import (
    RETRAIN_JOB_NAME,
    SENSORS,
    drift_report,
    freshness_policies,
)
from mlplatform.defs.registry import champion_model
from mlplatform.defs.rollout import ROLLOUT_JOB_NAME, rollout_report, rollout_sensor
from mlplatform.defs.serving import (
    DEPLOY_JOB_NAME,
    ENDPOINT_TAGS,
    endpoint_sensor,
    model_endpoint,
)
from mlplatform.defs.storage import RunScopedIOManager
from mlplatform.defs.training import candidate_model
from mlplatform.monitoring.rules import load_monitoring_settings
from mlplatform.resources import DataSource, MlflowTracking, RayServe

# Freshness windows are part of the assets' definitions: read when the definitions load.
FRESHNESS_POLICIES = freshness_policies(load_monitoring_settings())


def _with_freshness(spec: dg.AssetSpec) -> dg.AssetSpec:
    policy = FRESHNESS_POLICIES.get(spec.key.to_user_string())
    return spec if policy is None else spec.replace_attributes(freshness_policy=policy)


ASSETS = list(
    dg.map_asset_specs(
        _with_freshness,
        [
            raw_data,
            features,
            reference_profile,
            candidate_model,
            evaluation_report,
            champion_model,
            model_endpoint,
            drift_report,
            rollout_report,
        ],
    )
)

# Run tags the queue limits in dagster.yaml act on: one retrain at a time, and one deployment of
# the endpoint at a time (a rollback must not race a retrain's rolling update).
RETRAIN_TAGS = {"mlplatform/workload": "retrain", **ENDPOINT_TAGS}

retrain_job = dg.define_asset_job(
    RETRAIN_JOB_NAME,
    selection=dg.AssetSelection.assets("raw_data").downstream()
    - dg.AssetSelection.assets("drift_report"),
    tags=RETRAIN_TAGS,
    description="Ingest, train, evaluate, promote through the gate and redeploy the endpoint.",
)

rollback_job = dg.define_asset_job(
    "rollback_job",
    selection=dg.AssetSelection.assets("champion_model", "model_endpoint"),
    config={"ops": {"champion_model": {"config": {"action": "rollback"}}}},
    tags=ENDPOINT_TAGS,
    description="Point `champion` back at an earlier version (set `version` and `reason`) "
    "and redeploy the endpoint.",
)

deploy_job = dg.define_asset_job(
    DEPLOY_JOB_NAME,
    selection=dg.AssetSelection.assets("model_endpoint"),
    tags=ENDPOINT_TAGS,
    description="Deploy the version the registry's `champion` alias names now, without "
    "retraining (what `python -m mlplatform serve` and the endpoint sensor run).",
)

rollout_job = dg.define_asset_job(
    ROLLOUT_JOB_NAME,
    selection=dg.AssetSelection.assets("rollout_report", "model_endpoint"),
    tags=ENDPOINT_TAGS,
    description="Judge the challenger in the release on its live evidence and apply the verdict "
    "(or pause, resume, promote or abort it: `action` and `reason`), then serve the release.",
)

drift_report_job = dg.define_asset_job(
    "drift_report_job",
    selection=dg.AssetSelection.assets("drift_report"),
    description="Compare the champion's live traffic with its training data now.",
)

defs = dg.Definitions(
    assets=ASSETS,
    jobs=[retrain_job, rollback_job, deploy_job, rollout_job, drift_report_job],
    sensors=[*SENSORS, endpoint_sensor, rollout_sensor],
    resources={
        "data_source": DataSource(),
        "mlflow_tracking": MlflowTracking(),
        "ray_serve": RayServe(),
        # Each run's outputs in a directory of their own, written atomically (defs/storage.py).
        "io_manager": RunScopedIOManager(),
    },
    # Steps share one process: the graph is a chain, and a process per step costs seconds each.
    executor=dg.in_process_executor,
)
