"""Watching jobs work against a real `easel serve` (the session's live_server, demo models on CPU): the task event
stream read with a real streaming HTTP client, A1111's /progress preview, and the official `openai` SDK's image
streaming."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from tests.e2e.conftest import LiveServer

pytestmark = pytest.mark.e2e

SLOW_A1111 = {"prompt": "a slow cabin", "steps": 30, "width": 64, "height": 64, "seed": 4}  # ~1 s on CPU


@pytest.fixture(scope="module")
def live(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=300) as client:
        yield client


def sse(response: httpx.Response, limit: int = 1000) -> Iterator[dict]:
    """The events of a text/event-stream response: {"event", "id", "data" (parsed JSON)}, comments skipped."""
    event: dict = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if "data" in event:
                event["data"] = json.loads(event["data"])
                yield event
                limit -= 1
                if not limit:
                    return
            event = {}
            continue
        name, _, value = line.partition(":")
        event[name] = value.removeprefix(" ")


def png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "PNG"
    return image


def submit_async(live: httpx.Client) -> str:
    r = live.post("/v2/automatic1111/sdapi/v1/txt2img", json={**SLOW_A1111, "async": True})
    assert r.status_code == 202, r.text
    return r.json()["task_address"]


def test_task_events_stream_progress_previews_and_the_result(live: httpx.Client) -> None:
    address = submit_async(live)
    with live.stream("GET", f"/v2/tasks/{address}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse(r))
    names = [e["event"] for e in events]
    assert names[-1] == "completed" and set(names[:-1]) <= {"queued", "progress"}
    progress = [e for e in events if e["event"] == "progress"]
    assert progress, names
    steps = [e["data"]["step"] for e in progress]
    assert steps == sorted(steps) and all(e["data"]["steps"] == 30 for e in progress)
    previews = [e["data"] for e in progress if "preview" in e["data"]]
    assert previews and all(png(p["preview"]).size == (8, 8) for p in previews)  # 1/8 of 64x64
    assert all(p["preview_step"] % 5 == 0 for p in previews)  # preview_every_n_steps
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)
    final = events[-1]["data"]
    assert final["status"] == "completed" and png(final["result"]["images"][0]).size == (64, 64)
    # Late, with Last-Event-ID: only what is new, i.e. the final event.
    with live.stream("GET", f"/v2/tasks/{address}/events", headers={"Last-Event-ID": events[-2]["id"]}) as r:
        again = list(sse(r))
    assert [e["event"] for e in again] == ["completed"] and again[0]["data"] == final


def test_a_disconnected_watcher_never_cancels_the_job(live: httpx.Client) -> None:
    address = submit_async(live)
    with live.stream("GET", f"/v2/tasks/{address}/events") as r:
        first = next(sse(r))
    assert first["event"] in ("queued", "progress", "completed")
    deadline = time.monotonic() + 120
    while (body := live.get(f"/v2/tasks/{address}").json())["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert body["status"] == "completed"
    assert live.get("/v2/tasks/nope/events").status_code == 404


def test_a1111_progress_shows_the_live_preview(live: httpx.Client) -> None:
    done = threading.Event()

    def generate() -> None:
        try:
            live.post("/sdapi/v1/txt2img", json={**SLOW_A1111, "steps": 40})
        finally:
            done.set()

    threading.Thread(target=generate, daemon=True).start()
    preview = None
    while not done.is_set() and preview is None:
        body = live.get("/sdapi/v1/progress").json()
        preview = body["current_image"]
        if preview is not None:
            assert live.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
        time.sleep(0.05)
    done.wait(120)
    assert preview is not None, "no preview while the job ran (show_progress_every_n_steps: 10)"
    assert png(preview).size == (8, 8)


def test_openai_sdk_streams_partial_images_then_the_image(live_server: LiveServer) -> None:
    with openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        stream = client.images.generate(
            prompt="a lighthouse", size="64x64", stream=True, partial_images=2, extra_body={"steps": 9, "seed": 2}
        )
        events = list(stream)
    types = [e.type for e in events]
    assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(png(e.b64_json).size == (64, 64) for e in events)
    assert events[-1].usage.total_tokens > 0 and events[-1].size == "64x64"
