"""IndoxHub and Genrex dialects end to end: the session's real `easel serve`, real HTTP, the demo models on CPU."""

from __future__ import annotations

import base64
import io
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import LiveServer

pytestmark = pytest.mark.e2e

INDOXHUB = "/api/v1/images/generations"


def decode(raw: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def test_indoxhub_b64_json_and_url(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url, timeout=300) as client:
        # The document's model name; aspect_ratio 2:1 at 128x128's area -> 184x88 on SDXL (multiple of 8).
        body = {
            "model": "openai/dall-e-3",
            "prompt": "A serene mountain landscape at sunset, photorealistic",
            "size": "128x128",
            "quality": "low",
            "response_format": "b64_json",
            "additional_params": {"aspect_ratio": "2:1", "seed": 21, "enhance_prompt": True},
        }
        r = client.post(INDOXHUB, json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["provider"], out["model"], out["success"]) == ("openai", "dall-e-3", True)
        assert uuid.UUID(out["request_id"]) and out["usage"]["latency"] == out["duration_ms"] > 0
        assert "additional_params.enhance_prompt" in out["message"]
        (item,) = out["data"]
        assert item["url"] is None
        image = decode(base64.b64decode(item["b64_json"]))
        assert (image.format, image.size) == ("PNG", (184, 88))
        pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 1  # a real (noise) picture, not a blank canvas

        again = client.post(INDOXHUB, json=body).json()  # the same seed makes the same picture
        assert np.array_equal(np.asarray(decode(base64.b64decode(again["data"][0]["b64_json"])).convert("RGB")), pixels)

        body = {
            "prompt": "a red bicycle",
            "size": "64x64",
            "quality": "low",
            "additional_params": {"output_format": "webp"},
        }
        r = client.post(INDOXHUB, json=body)
        assert r.status_code == 200, r.text
        (item,) = r.json()["data"]
        assert item["b64_json"] is None and item["url"].startswith(f"{live_server.url}/v2/results/")
        fetched = client.get(item["url"])
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/webp"
        assert decode(fetched.content).size == (64, 64)

        secret = "sk-byok-e2e-5b1d0c"  # accepted, said to be ignored, in neither the server log nor the job DB
        body = {"prompt": "x", "size": "64x64", "byok_api_key": secret, "quality": "low", "response_format": "b64_json"}
        r = client.post(INDOXHUB, json=body)
        assert r.status_code == 200 and "byok_api_key ignored" in r.json()["message"]
        assert secret not in live_server.log.read_text()
        assert all(secret.encode() not in p.read_bytes() for p in live_server.data_dir.glob("easel.db*"))


def test_genrex_create_poll_fetch(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        body = {
            "prompt": "A futuristic city skyline at sunset with flying cars and neon lights",
            "model": "basic",  # demo SD1.5; the live server's `low` quality is one step (tests/e2e/conftest.py)
            "style": "digital_art",
            "size": "square",
            "quality": "low",
            "format": "webp",
        }
        started = time.monotonic()
        r = client.post("/v1/image/create", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["success"] is True
        image_id = r.json()["id"]
        assert str(uuid.UUID(image_id)) == image_id
        seen = set()
        deadline = time.monotonic() + 300
        while True:
            status = client.get(f"/image/status/{image_id}").json()
            seen.add(status["status"])
            if status["status"] in ("completed", "failed"):
                break
            assert time.monotonic() < deadline, f"still {status['status']} after 300 s"
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        assert status["status"] == "completed", status
        assert seen <= {"queued", "processing", "completed"}
        fetched = client.get(status["data"]["url"])
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/webp"
        image = decode(fetched.content)
        assert (image.format, image.size) == ("WEBP", (1024, 1024))
        # 1024x1024, 10 steps (quality low = half of the demo SDXL's 20) of the tiny demo SDXL on CPU.
        print(f"genrex square/low on the demo SDXL: {elapsed:.1f} s from create to completed")

        assert client.get(f"/image/status/{uuid.uuid4()}").status_code == 404
