"""Processes the benchmarks start: loopback ports, process groups, a Ray head stopped by pid.

Shared by ``pipeline.py``, ``serving.py`` and ``drift_loop.py`` (run as ``python benchmarks/X.py``,
so this folder is on ``sys.path``). Everything listens on 127.0.0.1, and every process started
here runs in its own process group, so it is stopped by its pid, never by name.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_is_open(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Wait until something accepts connections on ``127.0.0.1:port``.

    Raises:
        TimeoutError: after ``timeout_s``, or as soon as ``process`` (the one that should open
            the port) has exited.

    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_is_open(port):
            return
        if process is not None and process.poll() is not None:
            raise TimeoutError(f"{process.args[0]} exited ({process.returncode}) before {port}")
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout_s:.0f} s")


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a process in its own process group, output to ``log``."""
    handle = log.open("w")
    return subprocess.Popen(
        command, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def start_ray_head(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A Ray head on 127.0.0.1:port in the foreground (``--block``), so it stops by pid.

    Returns once the head accepts connections and its raylet had a moment to come up.
    """
    head = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        f"--node-ip-address={LOOPBACK}", f"--port={port}", "--include-dashboard=false",
        "--disable-usage-stats",
    ]  # fmt: skip
    process = start(head, env, log)
    try:
        wait_for_port(port, 120, process)
    except TimeoutError as error:
        stop(process)
        raise RuntimeError(f"the Ray head did not start ({error}); see {log}") from error
    time.sleep(2)  # the raylet comes up just after the GCS port opens
    return process
