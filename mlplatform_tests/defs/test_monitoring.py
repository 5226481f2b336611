"""The monitoring sensors on a real instance, before there is anything to monitor (no Ray).

The sensors with traffic to judge are exercised end to end in test_loop.py and
test_public_datasets.py; these are the ticks of a platform that has no champion yet.
"""

import dagster as dg

from mlplatform.defs.monitoring import drift_sensor, freshness_sensor
from mlplatform.monitoring.rules import DriftCursor
from mlplatform_tests.support import T0, tick


def test_drift_sensor_without_a_champion_skips_and_keeps_its_cursor(instance: dg.DagsterInstance):
    first = tick(drift_sensor, instance)

    assert not first.run_requests and not first.asset_events
    assert first.skip_reason.skip_message == "No evaluation: no champion yet."
    assert first.cursor == DriftCursor().dump()

    # A tick with nothing to compare keeps the memory of the last retrain (and its cooldown).
    remembered = DriftCursor("v1-0123456789ab", retrained_version="1", retrained_at=T0).dump()
    again = tick(drift_sensor, instance, cursor=remembered)

    assert not again.run_requests
    assert again.skip_reason.skip_message == "No evaluation: no champion yet."
    assert again.cursor == remembered


def test_freshness_sensor_keeps_no_cursor(instance: dg.DagsterInstance):
    # Staleness is read from the instance on every tick: nothing is carried between ticks.
    result = tick(freshness_sensor, instance)

    assert not result.run_requests
    assert result.skip_reason.skip_message.startswith("Everything fresh")
    assert result.cursor is None
