"""The Ray Serve application and how it is deployed. Imports nothing from Dagster."""

import os

# Ray reads these once, when it is first imported, so they are set before any Ray import here.
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps a single-machine Ray on 127.0.0.1 instead of swapping
# loopback for the machine's routable address; a multi-node cluster is configured explicitly
# (RAY_ADDRESS=ray://head:10001, or this variable set to 1).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Token authentication: `ray.init()` turns it on for new local clusters but `ray start` only when
# a token file already exists, so without an explicit mode the two disagree on a machine that ran
# one of them before. The token lives in ~/.ray/auth_token (created on first use) or comes from
# RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH; set RAY_AUTH_MODE=disabled for a cluster without it.
os.environ.setdefault("RAY_AUTH_MODE", "token")
