"""Judging a model: metrics, intervals, slices, plots, the model card. No Dagster, no Ray."""
