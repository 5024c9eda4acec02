"""What a new user sees: the README's tour runs as written against a real server, and the server's log reads well
when it is not a terminal (no progress-bar escape codes, no torchvision noise, one line when it is ready)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.e2e.conftest import LiveServer

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def readme_block(heading: str, language: str) -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block under '{heading}'"
    return match.group(1)


def test_the_readme_tour_runs_as_written(live_server: LiveServer, tmp_path: Path) -> None:
    script = readme_block("A short tour", "bash").replace("127.0.0.1:7860", f"127.0.0.1:{live_server.port}")
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, done.stderr
        assert "Steps: 20" in done.stdout and "Seed: 42" in done.stdout  # the infotext the tour prints
        assert Image.open(tmp_path / "out.png").size == (512, 512)
        assert '"status":"ready"' in done.stdout
    finally:  # the tour switches the A1111 model: give the other end-to-end tests their default back
        httpx.post(f"{live_server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "demo-sd15"}, timeout=30)


def test_the_readme_webuiapi_example_runs(live_server: LiveServer, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    example = re.search(r"```python\n(import webuiapi\n.*?)```", readme, re.S)
    assert example, "the webuiapi example is gone from the README"
    code = example.group(1).replace("port=7860", f"port={live_server.port}")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "lighthouse.png").size == (512, 512)


def test_the_log_is_plain_lines_with_one_ready_line(live_server: LiveServer) -> None:
    deadline = time.monotonic() + 30
    while "ready at http://" not in live_server.log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)
    log = live_server.log.read_text(errors="replace")
    assert "\r" not in log and "\x1b[" not in log, "progress-bar escape codes in a log that is not a terminal"
    assert "torchvision" not in log
    (ready,) = [line for line in log.splitlines() if "ready at http://" in line]
    assert f"http://127.0.0.1:{live_server.port}" in ready and "demo-sd15" in ready
    assert re.search(r"loading demo-sd15 \(sd15, float32\)", log)
    assert re.search(r"demo-sd15 unet: UNet2DConditionModel, [\d.]+k parameters, [\d.]+ MiB", log)
    assert re.search(r"loaded demo-sd15 \(sd15\) in [\d.]+ s", log)
