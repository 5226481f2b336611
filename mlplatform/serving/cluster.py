"""Running the serving app on Ray: a local head started on demand, or an existing cluster.

The local head is a long-lived ``ray start --head`` process bound to 127.0.0.1, so the endpoint
outlives the command that deployed it; ``LocalHead.stop`` (``make stop``) shuts it down. With
``RAY_ADDRESS`` set the platform deploys to that cluster and never starts one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from pydantic import ValidationError
from ray import serve
from ray.serve.schema import ApplicationStatus

from mlplatform.monitoring.rules import EndpointState
from mlplatform.serving.app import build_app
from mlplatform.serving.ingress import (
    fast_ingress_environment,
    haproxy_directory,
    haproxy_environment,
    stop_stray_haproxy,
)
from mlplatform.serving.keys import KeyDigests, require_keys_beyond_loopback
from mlplatform.serving.release import Release
from mlplatform.serving.settings import ServingSettings

LOOPBACK = "127.0.0.1"

logger = logging.getLogger(__name__)


def _ray_executable() -> str:
    """The ``ray`` CLI of this interpreter's environment (so workers share our packages)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def loopback_environment(haproxy_dir: Path) -> dict[str, str]:
    """Environment for the embedded single-node Ray head: loopback only, fast serving path.

    The same settings as this process (see ``mlplatform.serving``), made explicit for the
    ``ray start`` child so head and drivers agree, and the fast serving path (direct ingress
    behind HAProxy, see :mod:`mlplatform.serving.ingress`, its files in ``haproxy_dir``) unless
    this environment sets those variables otherwise (``RAY_SERVE_ENABLE_HA_PROXY=0
    RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` is Serve's default Python proxy). Authentication is
    :meth:`LocalHead.environment`'s part.
    """
    return {
        **fast_ingress_environment(single_node=True),
        **haproxy_environment(haproxy_dir),
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
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


def ensure_auth_token(path: Path) -> Path:
    """Create a random Ray authentication token at ``path`` (mode 0600) unless one is there.

    Ray 2.60 creates a token only for clusters started by ``ray.init()`` (in ``~/.ray``);
    ``ray start`` with token authentication expects one to exist. The platform therefore makes
    its own, beside the rest of its state, so a machine that never ran Ray works and deleting
    the platform home resets it. Concurrent callers agree on one token: it is written to a
    private temporary file and linked into place, which fails if another caller was first.

    Returns:
        ``path``.

    """
    if path.exists():
        return path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    return path


@dataclasses.dataclass(frozen=True)
class LocalHead:
    """The embedded Ray head: a ``ray start --head`` on 127.0.0.1 with token authentication.

    The head runs in a session of its own (its own process group), so it outlives the command
    that started it, a Ctrl-C in that terminal does not reach it, and nothing Ray does to its
    process group reaches the caller. Its process group is recorded in ``state_dir``, so
    :meth:`stop` stops exactly this head and no other Ray on the machine.

    Attributes:
        port: the head's GCS port.
        state_dir: where the head's token and process group are kept (the platform home's
            ``ray/``). The token is used unless the environment names one of its own
            (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``).
        metrics_port: where the head serves Prometheus metrics (Ray's metrics export port: the
            endpoint's metrics, :mod:`mlplatform.serving.metrics`, and Ray's own). Ray binds it
            to the node's address, 127.0.0.1 here; ``None`` lets Ray pick a free port.

    """

    port: int
    state_dir: Path
    metrics_port: int | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def auth_token_path(self) -> Path:
        """The token file the head and every driver present."""
        return self.state_dir / "auth_token"

    @property
    def haproxy_dir(self) -> Path:
        """The private directory (mode 0700) of this head's HAProxy configuration and sockets."""
        return haproxy_directory(self.state_dir)

    @property
    def process_group_path(self) -> Path:
        """The file holding the head's process group id while it runs."""
        return self.state_dir / "head.pgid"

    def auth_environment(self) -> dict[str, str]:
        """``RAY_AUTH_MODE=token`` and where the token is, creating the platform's on first use."""
        if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
            return {"RAY_AUTH_MODE": "token"}
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(ensure_auth_token(self.auth_token_path)),
        }

    def environment(self) -> dict[str, str]:
        """The whole environment of the head's processes: loopback, serving path, token."""
        return loopback_environment(self.haproxy_dir) | self.auth_environment()

    def ensure_running(self, serve_port: int | None = None, timeout_s: float = 90.0) -> str:
        """Start the head unless one already answers on its port.

        Args:
            serve_port: the endpoint port; a new head is refused if something else holds it.
            timeout_s: how long to wait for the head.

        Returns:
            The head's address.

        Raises:
            RuntimeError: if ``ray start`` fails or the head does not come up in time.

        """
        if port_is_open(LOOPBACK, self.port):
            return self.address
        # A head that died (a crash, a reboot) may have left its HAProxy holding the port.
        stop_stray_haproxy(self.haproxy_dir)
        if serve_port is not None and port_is_open(LOOPBACK, serve_port):
            # Two Ray Serve proxies can share a port (SO_REUSEPORT) and would split the traffic.
            raise RuntimeError(
                f"port {serve_port} is already in use but no Ray head answers on {self.address}: "
                "stop the other server (or another Ray cluster: `make stop`) or set "
                "MLPLATFORM_SERVE_PORT"
            )
        if self.metrics_port is not None and port_is_open(LOOPBACK, self.metrics_port):
            # Ray's agent would fail to bind it and the head would come up without metrics.
            raise RuntimeError(
                f"port {self.metrics_port} is already in use: stop what holds it or set "
                "MLPLATFORM_METRICS_PORT"
            )
        command = [
            _ray_executable(),
            "start",
            "--head",
            f"--node-ip-address={LOOPBACK}",
            f"--port={self.port}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        if self.metrics_port is not None:
            command.append(f"--metrics-export-port={self.metrics_port}")
        environment = self.environment()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        starter = subprocess.Popen(
            command,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.process_group_path.write_text(f"{starter.pid}\n")
        output, _ = starter.communicate()
        if starter.returncode != 0:
            self._abandon(starter.pid)
            raise RuntimeError(f"`{' '.join(command)}` failed:\n{output}")
        deadline = time.monotonic() + timeout_s
        while not port_is_open(LOOPBACK, self.port):
            if time.monotonic() > deadline:
                self._abandon(starter.pid)
                raise RuntimeError(
                    f"Ray head did not listen on {self.address} within {timeout_s:.0f}s"
                )
            time.sleep(0.2)
        return self.address

    def _abandon(self, group: int) -> None:
        """Kill what a head that failed to start left running (``ray start`` leaves its GCS)."""
        _signal_group(group, signal.SIGKILL)
        stop_stray_haproxy(self.haproxy_dir)
        self.process_group_path.unlink(missing_ok=True)

    def stop(self, grace_s: float = 2.0) -> bool:
        """Stop this head, its Serve apps and the endpoint: its whole process group.

        Serve is shut down first, so replicas close cleanly (traffic recorders write their last
        profile window); then the head's processes get SIGTERM and, after ``grace_s``, SIGKILL
        (Ray's GCS server does not exit on SIGTERM alone), and any HAProxy of the head still
        running is killed and its directory emptied. A recorded process group is
        signalled only while the head answers on its port, so a record left behind by a reboot
        never reaches a process that reused the number.

        Returns:
            Whether a head started from this state directory was running.

        """
        try:
            group = int(self.process_group_path.read_text())
        except (FileNotFoundError, ValueError):
            return False
        running = port_is_open(LOOPBACK, self.port)
        if running:
            self._shut_down_serve()
            alive = _signal_group(group, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while alive and time.monotonic() < deadline:
                time.sleep(0.2)
                alive = _signal_group(group, 0)
            if alive:
                _signal_group(group, signal.SIGKILL)
        stop_stray_haproxy(self.haproxy_dir)
        self.process_group_path.unlink(missing_ok=True)
        return running

    def _shut_down_serve(self) -> None:
        """Ask Serve to stop every app and its proxies gracefully; report, never raise."""
        os.environ.update(self.auth_environment())
        try:
            ray.init(
                address=self.address,
                log_to_driver=False,
                logging_level=logging.WARNING,
                namespace="mlplatform",
                _node_ip_address=LOOPBACK,
            )
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        except Exception as error:  # the head is stopped by signal either way
            logger.warning("graceful Serve shutdown failed (%s); stopping the head anyway", error)


def _signal_group(group: int, signum: int) -> bool:
    """Send ``signum`` to a process group; whether any process of it was still there."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    return True


class DeployFailed(RuntimeError):
    """Ray Serve did not bring the app to RUNNING: a replica failed or could not be placed."""


def deploy(
    settings: ServingSettings,
    *,
    ray_address: str | None,
    host: str,
    port: int,
    app_name: str,
    local_head: LocalHead | None,
    route_prefix: str = "/",
    timeout_s: float = 180.0,
    api_keys: KeyDigests | None = None,
    release: Release | None = None,
) -> None:
    """Deploy (or roll forward) the serving app and wait until Ray Serve reports it running.

    Reuses this process's Ray connection when there is one (tests share one Ray instance);
    otherwise connects to ``ray_address`` or to the local head, which it starts if needed, and
    disconnects after. A redeploy is a rolling update: with several replicas the old ones answer
    until the new ones are ready; with one, Ray Serve stops the old replica first (check that a
    version loads before deploying it: :mod:`mlplatform.serving.preflight`). A deploy that changes
    only the release (champion, challenger, stage, share) is applied to the running replicas in
    place (``reconfigure``): nothing restarts.

    Args:
        settings: the serving app's arguments (model name or URI, limits, replicas).
        ray_address: an existing cluster's address; ``None`` for the local head.
        host: interface for Serve's HTTP proxy (applies when Serve first starts in a cluster).
        port: port for Serve's HTTP proxy.
        app_name: the Serve application name (one endpoint per name).
        local_head: the embedded head to start or reuse when ``ray_address`` is ``None``.
        route_prefix: the path the app answers under (``/``: ``/predict``).
        timeout_s: how long the app may take to be running.
        api_keys: digests and scopes of the keys requests must present
            (:mod:`mlplatform.serving.keys`); ``None``: an open endpoint, refused beyond loopback.
        release: the release to serve (with ``settings.model_name``); ``None``: the one model
            of ``settings.model_uri``.

    Raises:
        ExposedWithoutKeys: if ``host`` is not a loopback address and there are no keys; raised
            before anything is connected to, started or rolled.
        ValueError: if there is neither a Ray connection, a ``ray_address`` nor a local head.
        DeployFailed: if the app failed to deploy, or was not running within ``timeout_s``
            (replicas that cannot start or cannot be placed), with Ray Serve's reason.

    """
    require_keys_beyond_loopback(host, api_keys)
    connected_here = not ray.is_initialized()
    if connected_here:
        if ray_address is None:
            if local_head is None:
                raise ValueError("deploy needs a ray_address or a local_head to start")
            # The driver presents the head's token: in this process's environment before Ray
            # reads it (on the first connection).
            os.environ.update(local_head.auth_environment())
            address = local_head.ensure_running(serve_port=port)
        else:
            address = ray_address
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
        # Not serve.run: it waits for RUNNING without a bound, and replicas that cannot be
        # placed keep an app deploying forever.
        serve.run_many(
            [
                serve.RunTarget(
                    build_app(settings.model_dump(), api_keys, release),
                    name=app_name,
                    route_prefix=route_prefix,
                )
            ],
            wait_for_applications_running=False,
        )
        _wait_until_running(app_name, timeout_s)
    finally:
        if connected_here:
            ray.shutdown()


def _wait_until_running(app_name: str, timeout_s: float) -> None:
    """Poll Serve's status until ``app_name`` is RUNNING.

    Raises:
        DeployFailed: when it is DEPLOY_FAILED, or not RUNNING within ``timeout_s``.

    """
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        if app is None:
            status, why = "missing", "no such application"
        else:
            status = app.status
            if status == ApplicationStatus.RUNNING:
                return
            details = [app.message] if app.message else []
            details += [
                f"{name}: {deployment.message}"
                for name, deployment in app.deployments.items()
                if deployment.message
            ]
            why = "; ".join(details) or "no message"
        if status == ApplicationStatus.DEPLOY_FAILED:
            raise DeployFailed(f"Ray Serve failed to deploy {app_name}: {why}")
        if time.monotonic() > deadline:
            raise DeployFailed(
                f"{app_name} was not running after {timeout_s:.0f}s (status {status}): {why}"
            )
        time.sleep(0.5)


def observe_endpoint(url: str, timeout_s: float = 5.0) -> EndpointState:
    """What ``GET /healthz`` says: serving a version, unhealthy (a bad answer) or down.

    Never raises: an endpoint that does not answer is a state, not an error.
    """
    try:
        response = httpx.get(f"{url}/healthz", timeout=timeout_s)
    except httpx.HTTPError as error:
        return EndpointState("down", detail=f"{type(error).__name__}: {error}"[:300])
    if response.status_code != 200:
        return EndpointState(
            "unhealthy", detail=f"HTTP {response.status_code}: {response.text[:200]}"
        )
    try:
        body = response.json()
    except ValueError:
        body = None
    version = body.get("model_version") if isinstance(body, dict) else None
    if not version or body.get("status") != "ok":
        return EndpointState("unhealthy", detail=f"unexpected answer: {response.text[:200]}")
    try:
        release = Release.model_validate(body.get("release") or {"champion": str(version)})
    except ValidationError:
        return EndpointState("unhealthy", detail=f"unexpected release: {response.text[:200]}")
    return EndpointState("serving", version=str(version), rollout=release.rollout_label)


def wait_until_serving(
    url: str, model_version: str, timeout_s: float = 120.0, rollout: str | None = None
) -> EndpointState:
    """Poll ``GET /healthz`` until the endpoint serves ``model_version`` (with ``rollout``).

    Args:
        url: the endpoint.
        model_version: the champion it must serve.
        timeout_s: how long to wait.
        rollout: the challenger it must serve beside it (:attr:`Release.rollout_label`);
            ``None``: none.

    Returns:
        The endpoint's state, serving that release.

    Raises:
        TimeoutError: if that release is not served within ``timeout_s``.

    """
    wanted = EndpointState("serving", model_version, rollout=rollout)
    deadline = time.monotonic() + timeout_s
    while True:
        state = observe_endpoint(url)
        if state == wanted:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{url} did not serve {wanted.describe().removeprefix('serving ')} within "
                f"{timeout_s:.0f}s (it is {state.describe()})"
            )
        time.sleep(0.5)
