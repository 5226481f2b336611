"""mlplatform: a Dagster asset-based ML platform for tabular models."""
