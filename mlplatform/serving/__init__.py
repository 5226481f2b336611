"""The Ray Serve application and how it is deployed. Imports nothing from Dagster."""

import os

# Ray reads this once, when it is first imported: 0 keeps a single-machine Ray on 127.0.0.1
# instead of swapping loopback for the machine's routable address. A multi-node cluster is
# configured explicitly (RAY_ADDRESS=ray://head:10001, or set this variable to 1).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
