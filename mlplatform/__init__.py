"""mlplatform: a Dagster asset-based ML platform for tabular models."""

import os

# whylogs reports usage statistics over the network on import unless told not to; the platform's
# traffic stays on the machine (or the cluster) it runs on.
os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "True")
