"""A real `easel serve` subprocess on a free loopback port, shared by the end-to-end tests of a session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import webuiapi

from tests.conftest import REPO_ROOT, free_port


class LiveServer:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path, data_dir: Path):
        self.port = port
        self.data_dir = data_dir
        self.proc = proc
        self.log = log
        self.url = f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, log: Path, interval: float) -> None:
    """Until `easel serve` at `url` answers /readyz; the test fails with the log's tail if the server exits or is not
    ready within 300 s."""
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            pytest.fail(f"easel serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"easel serve not ready after 300 s:\n{log.read_text()[-4000:]}")
        time.sleep(interval)


def served_models_yaml(folder: Path) -> Path:
    """The repo's models.yaml plus a `background_removal:` model (a tiny random-weight SegFormer folder built here),
    so `background: transparent` runs end to end."""
    from pipelines.demo import build_demo_background_remover

    remover = build_demo_background_remover(folder / "background-removal")
    path = folder / "models.yaml"
    text = (REPO_ROOT / "models.yaml").read_text()
    path.write_text(f"{text}\nbackground_removal:\n  source: {remover}\n")
    return path


@pytest.fixture(scope="session")
def live_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "easel.log"
    models = served_models_yaml(tmp_path_factory.mktemp("models"))
    easel = Path(sys.executable).parent / "easel"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "EASEL_MAX_STEPS": "400",
        "EASEL_DRAIN_TIMEOUT_S": "5",  # teardown: leftover jobs get 5 s, not the default 30
        # Genrex sizes are 1024 px and up: one step at `low` keeps its end-to-end test fast on CPU.
        "EASEL_GENREX_QUALITY_STEPS": '{"low": 0.05, "medium": 0.5, "high": 1.0}',
        # GenPicz style thumbnails: 2 steps at 128 px instead of the model's 20 at 256.
        "EASEL_STYLE_THUMBNAIL_STEPS": "2",
        "EASEL_STYLE_THUMBNAIL_SIZE": "128",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(easel),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                "--models",
                str(models),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = LiveServer(port, proc, log, data_dir)
    try:
        wait_ready(proc, server.url, log, interval=0.5)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def api(live_server: LiveServer) -> webuiapi.WebUIApi:
    """The real `webuiapi` client on the live server, Euler and 2 steps by default; a module that wants other defaults
    defines its own `api`."""
    return webuiapi.WebUIApi(host="127.0.0.1", port=live_server.port, sampler="Euler", steps=2)
