"""The /v2 gateway end to end: real `easel serve` processes, real HTTP, the demo models on CPU.

The shared `live_server` runs the default settings. Routes that need other settings (gpt-image quality -> 1 step,
a gemini pixel cap that keeps CPU work small, loopback allowed for image URLs) and the restart test use this module's
own server, on its own data directory (the demo models are shared with the session's through a symlink).
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import free_port
from tests.e2e.conftest import LiveServer, wait_ready

pytestmark = pytest.mark.e2e

TERMINAL = ("completed", "failed", "cancelled")
# auto/low/medium: 1 step of the demo SDXL (default 20 steps); high: 100 steps, long enough to cancel or kill.
QUALITY_STEPS = '{"auto": 0.05, "low": 0.05, "medium": 0.05, "high": 5.0}'


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(data: str | bytes) -> Image.Image:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def poll(client: httpx.Client, task_address: str, until: tuple[str, ...] = TERMINAL, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v2/tasks/{task_address}").json()
        if body["status"] in until:
            return body
        assert time.monotonic() < deadline, f"task still {body['status']} after {timeout} s"
        time.sleep(0.1)


class EaselProcess:
    """`easel serve` on a fixed port and data directory, which can be killed and started again."""

    def __init__(self, data_dir: Path, env: dict[str, str]):
        self.data_dir = data_dir
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / "easel.log"

    def start(self) -> None:
        easel = Path(sys.executable).parent / "easel"
        cmd = [str(easel), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True
            )
        wait_ready(self.proc, self.url, self.log, interval=0.3)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def own_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EaselProcess]:
    own_data = tmp_path_factory.mktemp("gateway-data")
    (data_dir / "demo-models").mkdir(parents=True, exist_ok=True)
    (own_data / "demo-models").symlink_to(data_dir / "demo-models", target_is_directory=True)
    env = {
        "HF_HUB_OFFLINE": "1",
        "EASEL_GPT_IMAGE_QUALITY_STEPS": QUALITY_STEPS,
        "EASEL_MAX_OUTPUT_PIXELS": str(128 * 128),
        "EASEL_FETCH_ALLOWED_NETWORKS": '["127.0.0.1/32"]',
    }
    server = EaselProcess(own_data, env)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=300) as client:
        yield client


@pytest.fixture
def own(own_server: EaselProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=own_server.url, timeout=300) as client:
        yield client


# Default settings (shared live server) --------------------------------------------------------------------------------


def test_flux_sync_png_jpeg_and_seed_reproducibility(live: httpx.Client) -> None:
    body = {"prompt": "a lighthouse at dusk", "width": 64, "height": 96, "seed": 1234}
    first = live.post("/v2/image/flux/generate", json=body)
    assert first.status_code == 200, first.text
    image = decode(first.json()["images"][0])
    assert (image.format, image.size) == ("PNG", (64, 96))
    again = live.post("/v2/image/flux/generate", json=body).json()
    assert again == first.json()  # same seed, same bytes
    other = decode(live.post("/v2/image/flux/generate", json={**body, "seed": 1235}).json()["images"][0])
    assert np.abs(np.asarray(other, dtype=np.int16) - np.asarray(image, dtype=np.int16)).max() > 10
    jpeg = decode(live.post("/v2/image/flux/generate", json={**body, "output_format": "jpeg"}).json()["images"][0])
    assert (jpeg.format, jpeg.size) == ("JPEG", (64, 96))


def test_validation_errors_name_the_field(live: httpx.Client) -> None:
    r = live.post("/v2/image/flux/generate", json={"prompt": "x", "width": 100})
    assert r.status_code == 422 and r.json()["error"]["field"] == "width"
    r = live.post("/v2/image/qwen/generate", json={"prompt": "x", "size": "100x100"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "size"
    r = live.post("/v2/image/qwen/edit", json={"prompt": "x", "image": "http://127.0.0.1:1/a.png"})
    assert r.status_code == 422 and "loopback" in r.json()["error"]["message"]  # no allow-list here


def test_qwen_async_then_fetch_the_url(live: httpx.Client) -> None:
    body = {"prompt": "a red bicycle", "size": "64x80", "seed": 3, "async": True}
    r = live.post("/v2/image/qwen/generate", json=body)
    assert r.status_code == 202, r.text
    task = poll(live, r.json()["task_address"])
    assert task["status"] == "completed", task
    assert task["seeds"] == [3] and task["model"] == "demo-qwen-image" and task["expires_at"]
    (url,) = task["result"]["urls"]
    assert url.startswith(f"{str(live.base_url).rstrip('/')}/v2/results/") and url.partition("?")[0].endswith(".png")
    image = live.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.headers["x-content-type-options"] == "nosniff"
    assert decode(image.content).size == (64, 80)


def test_qwen_edit_base64(live: httpx.Client) -> None:
    source = Image.new("RGB", (96, 64), (200, 30, 30))
    body = {"prompt": "make it blue", "image": png_b64(source), "size": "64x64", "seed": 5}
    r = live.post("/v2/image/qwen/edit", json=body)
    assert r.status_code == 200, r.text
    assert decode(live.get(r.json()["urls"][0]).content).size == (64, 64)


def test_a1111_txt2img_async(live: httpx.Client) -> None:
    body = {"prompt": "a cabin", "steps": 2, "width": 64, "height": 64, "seed": 9, "async": True}
    r = live.post("/v2/automatic1111/sdapi/v1/txt2img", json=body)
    assert r.status_code == 202, r.text
    task = poll(live, r.json()["task_address"])
    assert task["status"] == "completed", task
    result = task["result"]
    assert decode(result["images"][0]).size == (64, 64)
    assert '"seed": 9' in result["info"] and result["parameters"]["steps"] == 2


# Own server: 1-step gpt-image, gemini pixel cap, loopback URLs, cancel, restart ---------------------------------------


def test_gpt_image_generate_1024_one_step(own: httpx.Client) -> None:
    r = own.post("/v2/image/gpt-image/generate", json={"prompt": "a fox", "size": "1024x1024", "quality": "low"})
    assert r.status_code == 200, r.text
    (url,) = r.json()["images"]
    assert decode(own.get(url).content).size == (1024, 1024)


def test_gpt_image_edit_with_mask_keeps_unmasked_pixels(own: httpx.Client) -> None:
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 48, 128))  # edit the left part only
    body = {"prompt": "a hat", "image": png_b64(source), "mask": png_b64(mask), "size": "auto", "n": 2}
    r = own.post("/v2/image/gpt-image/edit", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2
    for url in r.json()["images"]:
        out = np.asarray(decode(own.get(url).content).convert("RGB"), dtype=np.int16)
        assert out.shape == (128, 128, 3)
        kept = np.abs(out[:, 64:] - np.asarray(source, dtype=np.int16)[:, 64:])  # well clear of the blurred edge
        assert kept.max() <= 2
        edited = np.abs(out[:, :40] - np.asarray(source, dtype=np.int16)[:, :40])
        assert edited.mean() > 10


def test_gemini_size_follows_ratio_and_cap(own: httpx.Client) -> None:
    r = own.post("/v2/image/gemini-3/generate", json={"prompt": "a wide valley", "aspect_ratio": "16:9"})
    assert r.status_code == 200, r.text
    assert decode(r.json()["images"][0]).size == (160, 96)  # 1K capped to 128*128 pixels (EASEL_MAX_OUTPUT_PIXELS)
    r = own.post("/v2/image/gemini-3/generate", json={"prompt": "a tower", "aspect_ratio": "9:16", "async": True})
    task = poll(own, r.json()["task_address"])
    assert decode(task["result"]["images"][0]).size == (96, 160)


def test_qwen_edit_from_an_allowed_url(own: httpx.Client) -> None:
    """The image URL is a result URL of this same server: loopback, allowed here by EASEL_FETCH_ALLOWED_NETWORKS."""
    made = own.post("/v2/image/gpt-image/generate", json={"prompt": "a house", "size": "auto"}).json()
    body = {"prompt": "paint it green", "image": made["images"][0], "size": "80x64", "seed": 2}
    r = own.post("/v2/image/qwen/edit", json=body)
    assert r.status_code == 200, r.text
    assert decode(own.get(r.json()["urls"][0]).content).size == (80, 64)


def long_job(client: httpx.Client) -> str:
    """A gpt-image job of 100 steps at 512x512 (quality high here): it runs for minutes unless stopped."""
    body = {"prompt": "slow", "size": "auto", "quality": "high", "async": True}
    r = client.post("/v2/image/gpt-image/generate", json=body)
    assert r.status_code == 202, r.text
    return r.json()["task_address"]


def test_cancel_a_running_job(own: httpx.Client) -> None:
    address = long_job(own)
    running = poll(own, address, until=("running", *TERMINAL))
    assert running["status"] == "running"
    started = time.monotonic()
    r = own.delete(f"/v2/tasks/{address}")
    assert r.status_code in (200, 202), r.text
    task = poll(own, address, timeout=60)
    assert task["status"] == "cancelled" and task["error"]["code"] == "cancelled" and task["result"] is None
    assert time.monotonic() - started < 30  # stopped at the next step, not after 100
    assert own.post(f"/v2/tasks/{address}/cancel").json()["status"] == "cancelled"


def test_restart_keeps_finished_jobs_and_fails_interrupted_ones(own_server: EaselProcess) -> None:
    with httpx.Client(base_url=own_server.url, timeout=300) as client:
        r = client.post("/v2/image/gpt-image/generate", json={"prompt": "a boat", "size": "auto", "async": True})
        done_address = r.json()["task_address"]
        done = poll(client, done_address)
        assert done["status"] == "completed"
        url = done["result"]["images"][0]
        image_bytes = client.get(url).content
        running_address = long_job(client)
        assert poll(client, running_address, until=("running", *TERMINAL))["status"] == "running"
        time.sleep(0.6)  # the housekeeping thread writes `running` to the database twice a second

    own_server.kill()  # no shutdown code: the job is left `running` in the database
    own_server.start()

    with httpx.Client(base_url=own_server.url, timeout=300) as client:
        after = client.get(f"/v2/tasks/{done_address}").json()
        assert after["status"] == "completed" and after["result"] == done["result"]
        assert client.get(url).content == image_bytes
        interrupted = client.get(f"/v2/tasks/{running_address}").json()
        assert interrupted["status"] == "failed"
        assert interrupted["error"] == {"code": "interrupted", "message": "interrupted by a server restart"}
        assert interrupted["started_at"] is not None and interrupted["finished_at"] is not None
