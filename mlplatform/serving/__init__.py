"""The Ray Serve application and how it is deployed. Imports nothing from Dagster."""

import importlib.metadata
import inspect
import os

SUPPORTED_RAY = "2.60"
"""The Ray minor release whose internals ``loopback`` patches and ``ingress`` configures."""


def require_supported_ray(installed: str | None = None) -> None:
    """Stop with a clear message unless the installed Ray is the supported minor release.

    ``loopback.bind_replica_grpc_to_loopback`` replaces a function of Ray Serve's private
    replica module, ``ingress`` relies on 2.60's HAProxy mode and its variables, and ``app``
    gives its deployment a code version of its own through ``Deployment.options(version=...,
    _internal=True)`` (so a change of the release reconfigures replicas instead of restarting
    them); another release could change any of these silently, so the platform refuses to
    start instead.

    Args:
        installed: the Ray version to check; default the installed one.

    Raises:
        RuntimeError: on any other Ray version.

    """
    installed = installed or importlib.metadata.version("ray")
    if installed.split(".")[:2] != SUPPORTED_RAY.split(".") or not _deployment_takes_a_version():
        raise RuntimeError(
            f"mlplatform's serving needs Ray {SUPPORTED_RAY}.x, found Ray {installed}: it relies "
            "on that release's internals (mlplatform/serving/loopback.py, ingress.py, app.py). "
            "Install "
            "the locked versions (`make install`, or `uv sync --locked`)."
        )


def _deployment_takes_a_version() -> bool:
    """Whether Ray Serve's ``Deployment.options`` still takes ``version`` with ``_internal``."""
    from ray.serve.deployment import Deployment

    parameters = inspect.signature(Deployment.options).parameters
    return "version" in parameters and "_internal" in parameters


# Ray reads these once, when it is first imported, so they are set before any Ray import here.
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps a single-machine Ray on 127.0.0.1 instead of swapping
# loopback for the machine's routable address; a multi-node cluster is configured explicitly
# (RAY_ADDRESS=ray://head:10001, or this variable set to 1).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Token authentication: `ray.init()` turns it on for new local clusters but `ray start` only when
# a token file already exists, so without an explicit mode the two disagree on a machine that ran
# one of them before. The platform's own head keeps its token in the platform home
# (`cluster.LocalHead`); a cluster of your own passes RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH; set
# RAY_AUTH_MODE=disabled for a cluster without authentication.
os.environ.setdefault("RAY_AUTH_MODE", "token")

require_supported_ray()
