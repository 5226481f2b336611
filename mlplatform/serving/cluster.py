"""Running the serving app on Ray: a local head started on demand, or an existing cluster.

The local head is a long-lived ``ray start --head`` process bound to 127.0.0.1, so the endpoint
outlives the command that deployed it; ``stop_local_head`` (``make stop``) shuts it down. With
``RAY_ADDRESS`` set the platform deploys to that cluster and never starts one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve

from mlplatform.serving.app import ServingSettings, build_app
from mlplatform.serving.ingress import fast_ingress_environment

LOOPBACK = "127.0.0.1"


def _ray_executable() -> str:
    """The ``ray`` CLI of this interpreter's environment (so workers share our packages)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def loopback_environment() -> dict[str, str]:
    """Environment for the embedded single-node Ray head: loopback only, token authentication.

    The same settings as this process (see ``mlplatform.serving``), made explicit for the
    ``ray start`` child so head and drivers agree, and the fast serving path (direct ingress
    behind HAProxy, see :mod:`mlplatform.serving.ingress`) unless this environment sets those
    variables otherwise (``RAY_SERVE_ENABLE_HA_PROXY=0 RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` is
    Serve's default Python proxy).
    """
    return {
        **fast_ingress_environment(single_node=True),
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
    }


def is_loopback(address: str) -> bool:
    """Whether a Ray address (``host:port`` or ``ray://host:port``) is this machine's loopback."""
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host in {"localhost", LOOPBACK}


def port_is_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def ensure_local_head(port: int, serve_port: int | None = None, timeout_s: float = 90.0) -> str:
    """Start a local Ray head on ``127.0.0.1:port`` unless one already answers there.

    Args:
        port: the head's GCS port.
        serve_port: the endpoint port; a new head is refused if something else holds it.
        timeout_s: how long to wait for the head.

    Returns:
        The head's address, ``127.0.0.1:<port>``.

    Raises:
        RuntimeError: if ``ray start`` fails or the head does not come up in time.

    """
    address = f"{LOOPBACK}:{port}"
    if port_is_open(LOOPBACK, port):
        return address
    if serve_port is not None and port_is_open(LOOPBACK, serve_port):
        # Two Ray Serve proxies can share a port (SO_REUSEPORT) and would split the traffic.
        raise RuntimeError(
            f"port {serve_port} is already in use but no Ray head answers on {address}: stop the "
            "other server (or another Ray cluster: `make stop`) or set MLPLATFORM_SERVE_PORT"
        )
    command = [
        _ray_executable(),
        "start",
        "--head",
        f"--node-ip-address={LOOPBACK}",
        f"--port={port}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    result = subprocess.run(
        command, env=loopback_environment(), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stdout}\n{result.stderr}")
    deadline = time.monotonic() + timeout_s
    while not port_is_open(LOOPBACK, port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray head did not listen on {address} within {timeout_s:.0f}s")
        time.sleep(0.2)
    return address


def stop_local_head() -> None:
    """Stop the local Ray processes (the head and its Serve apps)."""
    subprocess.run([_ray_executable(), "stop"], env=loopback_environment(), check=False)


def deploy(
    settings: ServingSettings,
    *,
    ray_address: str | None,
    host: str,
    port: int,
    app_name: str,
    local_ray_port: int,
    route_prefix: str = "/",
) -> None:
    """Deploy (or roll forward) the serving app and wait until Ray Serve reports it running.

    Reuses this process's Ray connection when there is one (tests share one Ray instance);
    otherwise connects to ``ray_address`` or to a local head it starts, and disconnects after.
    A redeploy is a rolling update: the old replicas answer until the new ones are ready.

    Args:
        settings: the serving app's arguments (model URI, limits, replicas).
        ray_address: an existing cluster's address; ``None`` for the local head.
        host: interface for Serve's HTTP proxy (applies when Serve first starts in a cluster).
        port: port for Serve's HTTP proxy.
        app_name: the Serve application name (one endpoint per name).
        local_ray_port: the local head's GCS port when ``ray_address`` is ``None``.
        route_prefix: the path the app answers under (``/``: ``/predict``).

    """
    connected_here = not ray.is_initialized()
    if connected_here:
        address = ray_address or ensure_local_head(local_ray_port, serve_port=port)
        init_args: dict[str, Any] = {
            "address": address,
            "log_to_driver": False,
            "namespace": "mlplatform",
        }
        if is_loopback(address):
            init_args["_node_ip_address"] = LOOPBACK
        ray.init(**init_args)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            build_app(settings.model_dump()),
            name=app_name,
            route_prefix=route_prefix,
            blocking=False,
        )
    finally:
        if connected_here:
            ray.shutdown()


def wait_until_serving(url: str, model_version: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll ``GET /healthz`` until the endpoint serves ``model_version``.

    Returns:
        The health response.

    Raises:
        TimeoutError: if that version is not served within ``timeout_s``.

    """
    deadline = time.monotonic() + timeout_s
    last: str = "no response"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/healthz", timeout=5)
            body = response.json() if response.status_code == 200 else {}
            if body.get("model_version") == model_version:
                return body
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as error:
            last = repr(error)
        time.sleep(0.5)
    raise TimeoutError(
        f"{url} did not serve model version {model_version} within {timeout_s:.0f}s ({last})"
    )
