"""A truncated traffic window never stops the drift sensor or drift_report: the readable windows
are compared, the unreadable ones named in the metadata (no Ray: the recorder writes the windows
in this process, as a replica's would).

A champion trained by the real assets on a real (temporary) MLflow store; real Dagster instance.
"""

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from mlplatform.defs.evaluation import evaluation_report
from mlplatform.defs.features import features, reference_profile
from mlplatform.defs.ingest import raw_data
from mlplatform.defs.monitoring import drift_report, drift_sensor
from mlplatform.defs.registry import champion_model
from mlplatform.defs.training import candidate_model
from mlplatform.monitoring.drift_summary import drift_summary_path, read_drift_summary
from mlplatform.monitoring.profiles import version_directory
from mlplatform.resources import MlflowTracking
from mlplatform.serving.recorder import TrafficRecorder
from mlplatform.settings import load_settings
from mlplatform_tests.support import binary_result, inputs, report_figure, tick


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.faults
def test_drift_sensor_and_report_skip_unreadable_windows_and_name_them(
    training_resources, instance, small_loans_csv, record_property
):
    trained = dg.materialize(
        [raw_data, features, reference_profile, candidate_model, evaluation_report, champion_model],
        resources=training_resources,
        instance=instance,
    )
    assert trained.success
    spec = trained.output_for_node("features").spec
    traffic = inputs(pd.read_csv(small_loans_csv), spec)
    settings = load_settings()
    for replica, rows in (("good", 600), ("cut-profile", 50), ("cut-sidecar", 70)):
        with TrafficRecorder(settings.traffic_dir, "mlplatform", "1", spec, replica) as recorder:
            recorder.record(replica, traffic.iloc[:rows], binary_result(rows))
    directory = version_directory(settings.traffic_dir, "mlplatform", "1")
    _truncate(next(directory.glob("*-cut-profile.bin")))
    _truncate(next(directory.glob("*-cut-sidecar.json")))

    ticked = tick(drift_sensor, instance)

    observation = ticked.asset_events[0]
    assert observation.metadata["traffic_windows"].value == 1
    assert observation.metadata["rows"].value == 600
    skipped = observation.metadata["skipped_files"].value
    assert sorted(Path(f["file"]).name.split("Z-", 1)[1] for f in skipped) == [
        "cut-profile.bin",
        "cut-sidecar.json",
    ]
    assert all(f["reason"].startswith("unreadable") for f in skipped)
    assert ticked.skip_reason.skip_message.startswith("No retrain")

    report = dg.materialize(
        [drift_report], resources={"mlflow_tracking": MlflowTracking()}, instance=instance
    )
    assert report.success
    metadata = report.asset_materializations_for_node("drift_report")[0].metadata
    assert metadata["rows"].value == 600
    assert metadata["skipped_files"].value == skipped
    # The summary the endpoint's replicas export as drift gauges: the same verdicts.
    summary = read_drift_summary(drift_summary_path(settings.traffic_dir, "mlplatform"))
    assert summary.model_version == "1" and summary.rows == 600
    drifted = {f.feature for f in summary.features if f.drifted}
    assert drifted == set(metadata["drifted_columns"].value)
    assert summary.features and all(f.feature in spec.features for f in summary.features)

    # With no readable window left, the tick says so and names what it skipped.
    _truncate(next(directory.glob("*-good.json")))
    empty = tick(drift_sensor, instance, cursor=ticked.cursor)
    assert not empty.run_requests
    assert "3 unreadable window files skipped" in empty.skip_reason.skip_message
    report_figure(
        record_property,
        "truncated_windows",
        files_cut=2,
        files_skipped=len(skipped),
        rows_compared=metadata["rows"].value,
    )
