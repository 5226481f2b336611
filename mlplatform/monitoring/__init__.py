"""Watching a served model: profiles, drift, feedback and the sensors' rules. No Dagster, no Ray."""
