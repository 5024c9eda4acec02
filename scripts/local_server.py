"""A throw-away `easel serve` on a free loopback port, for the scripts that drive a live server (fuzz.py,
loadtest.py), and the loopback check they apply to a server they are pointed at.

The server gets a fresh data directory (its own job database and result files) in which `demo-models` is a symlink to
a shared folder, so the tiny demo models are built once (on first use) and reused by every run.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DEMO_MODELS = REPO / "data" / "demo-models"


def is_loopback_url(url: str) -> bool:
    """True for an http(s) URL whose host is a loopback address (127.0.0.0/8, ::1) or `localhost`. Host names other
    than localhost are refused without resolving them: a name can point anywhere."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def easel_command() -> list[str]:
    script = Path(sys.executable).parent / "easel"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


@dataclass
class LocalServer:
    url: str
    pid: int
    data_dir: Path
    log: Path


@contextlib.contextmanager
def local_server(
    env: dict[str, str],
    *,
    demo_models: Path = DEFAULT_DEMO_MODELS,
    startup_timeout_s: float = 600.0,
    keep_data: bool = False,
) -> Iterator[LocalServer]:
    """`easel serve` with `env` (EASEL_* settings) on 127.0.0.1, ready (/readyz 200) when the block starts, stopped
    (SIGTERM to its process group, SIGKILL after 30 s) and its data directory removed after it."""
    data_dir = Path(tempfile.mkdtemp(prefix="easel-local-"))
    demo_models.mkdir(parents=True, exist_ok=True)
    (data_dir / "demo-models").symlink_to(demo_models.resolve(), target_is_directory=True)
    log = data_dir / "easel.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*easel_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "EASEL_DRAIN_TIMEOUT_S": "5", **env}
    with log.open("wb") as out:
        # Its own session: the whole server process group is ours to stop, and Ctrl-C here does not hit it twice.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"easel serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"easel serve not ready after {startup_timeout_s} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield LocalServer(url, proc.pid, data_dir, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if not keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
