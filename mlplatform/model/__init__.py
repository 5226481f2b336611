"""The trained artifact: spec, pipeline, MLflow model, training and registry. No Dagster, no Ray."""
