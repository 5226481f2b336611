"""mlplatform: a Dagster asset-based ML platform for tabular models."""

import os

# whylogs and MLflow report usage statistics over the network unless told not to; the platform's
# traffic stays on the machine (or the cluster) it runs on. Set before either is imported.
os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "True")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
