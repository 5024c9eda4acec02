"""Per-key isolation (issue #5): on every job route of every dialect, another key's job answers 404 (listing, status,
result URLs, delete, cancel, A1111 progress and interrupt); its owner and an admin key see it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pipelines.registry import Registry
from server.access.keys import NewKey
from server.app import create_app
from server.settings import Settings
from tests.api.fake_engine import FakeEngine


@dataclass
class Two:
    client: TestClient
    engine: FakeEngine
    alice: dict[str, str]
    bob: dict[str, str]
    admin: dict[str, str]


def bearer(key: NewKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.secret}"}


@pytest.fixture
def two(tmp_path: Path, registry: Registry) -> Iterator[Two]:
    engine = FakeEngine(registry)
    app = create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry)
    with TestClient(app) as client:
        keys = app.state.keys
        alice, bob = keys.create("alice", plan="studio"), keys.create("bob", plan="studio")
        admin = keys.create("ops", plan="studio", admin=True)
        yield Two(client, engine, bearer(alice), bearer(bob), bearer(admin))


def path_of(url: str) -> str:
    """The URL's path without its signature: fetched with a key, it is the owner's (or an admin's) only. The signed
    URL itself is a capability anyone handed it may load (tests/security/test_s8_result_links.py)."""
    return "/" + url.split("/", 3)[3].partition("?")[0]


def wait_finished(client: TestClient, url: str, headers: dict[str, str], done: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(url, headers=headers).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_gateway_tasks_results_and_cancel(two: Two) -> None:
    body = {"prompt": "a fox", "size": "auto", "quality": "low", "async": True}
    address = two.client.post("/v2/image/gpt-image/generate", json=body, headers=two.alice).json()["task_address"]
    task = f"/v2/tasks/{address}"
    done = wait_finished(two.client, task, two.alice, lambda b: b["status"] == "completed")
    image = path_of(done["result"]["images"][0])
    for headers, visible in ((two.alice, True), (two.admin, True), (two.bob, False)):
        assert (two.client.get(task, headers=headers).status_code == 200) is visible
        assert (two.client.get(image, headers=headers).status_code == 200) is visible
    assert two.client.get(task, headers=two.bob).json()["error"]["code"] == "task_not_found"
    # Cancel and delete of another key's job: 404, and the job is untouched.
    two.engine.block()
    address = two.client.post("/v2/image/gpt-image/generate", json=body, headers=two.alice).json()["task_address"]
    two.engine.wait_for_running()
    assert two.client.post(f"/v2/tasks/{address}/cancel", headers=two.bob).status_code == 404
    assert two.client.delete(f"/v2/tasks/{address}", headers=two.bob).status_code == 404
    two.engine.release()
    final = wait_finished(two.client, f"/v2/tasks/{address}", two.alice, lambda b: b["status"] == "completed")
    assert final["cancel_requested"] is False


def test_a1111_async_copy_goes_through_the_same_task_routes(two: Two) -> None:
    body = {"prompt": "a fox", "steps": 1, "width": 64, "height": 64, "async": True}
    r = two.client.post("/v2/automatic1111/sdapi/v1/txt2img", json=body, headers=two.alice)
    assert r.status_code == 202, r.text
    task = f"/v2/tasks/{r.json()['task_address']}"
    wait_finished(two.client, task, two.alice, lambda b: b["status"] == "completed")
    assert two.client.get(task, headers=two.bob).status_code == 404


def test_a1111_progress_and_interrupt_only_touch_own_jobs(two: Two) -> None:
    import threading

    two.engine.block()
    results: dict[str, Any] = {}

    def run() -> None:
        body = {"prompt": "a fox", "steps": 3, "width": 64, "height": 64}
        results["r"] = two.client.post("/sdapi/v1/txt2img", json=body, headers=two.alice)

    thread = threading.Thread(target=run)
    thread.start()
    job = two.engine.wait_for_running()
    assert two.client.get("/sdapi/v1/progress", headers=two.alice).json()["state"]["job_count"] >= 1
    bob_view = two.client.get("/sdapi/v1/progress", headers=two.bob).json()
    assert bob_view["current_image"] is None and bob_view["progress"] == 0
    two.client.post("/sdapi/v1/interrupt", headers=two.bob)
    assert not getattr(job, "interrupt_requested", False)
    two.client.post("/sdapi/v1/interrupt", headers=two.alice)
    assert job.interrupt_requested
    two.engine.release()
    thread.join(10)
    assert results["r"].status_code == 200


def test_openai_and_indoxhub_result_urls(two: Two) -> None:
    body = {"prompt": "a fox", "size": "64x64", "response_format": "url", "steps": 1}
    url = two.client.post("/v1/images/generations", json=body, headers=two.alice).json()["data"][0]["url"]
    assert two.client.get(path_of(url), headers=two.alice).status_code == 200
    assert two.client.get(path_of(url), headers=two.bob).status_code == 404
    body = {"prompt": "a fox", "size": "64x64", "response_format": "url"}
    r = two.client.post("/api/v1/images/generations", json=body, headers=two.alice)
    url = r.json()["data"][0]["url"]
    assert two.client.get(path_of(url), headers=two.bob).status_code == 404
    assert two.client.get(path_of(url), headers=two.admin).status_code == 200


def test_genpicz_get_list_delete_and_image(two: Two) -> None:
    made = two.client.post("/v1/generate", json={"prompt": "a fox", "width": 512, "height": 512}, headers=two.alice)
    assert made.status_code == 200, made.text
    gen = made.json()
    item = f"/v1/generations/{gen['generation_id']}"
    assert two.client.get(item, headers=two.alice).status_code == 200
    assert two.client.get(item, headers=two.bob).status_code == 404
    assert two.client.get(path_of(gen["image_url"]), headers=two.bob).status_code == 404
    listing = two.client.get("/v1/generations", headers=two.bob).json()
    assert listing["data"] == [] and listing["total"] == 0
    assert two.client.get("/v1/generations", headers=two.alice).json()["total"] == 1
    assert two.client.get("/v1/generations", headers=two.admin).json()["total"] == 1
    assert two.client.delete(item, headers=two.bob).status_code == 404
    assert two.client.get(item, headers=two.alice).status_code == 200  # still there
    assert two.client.delete(item, headers=two.alice).status_code == 200


def test_genrex_status_and_image(two: Two) -> None:
    body = {"prompt": "a futuristic city skyline at dusk", "size": "square", "quality": "low"}
    job_id = two.client.post("/image/create", json=body, headers=two.alice).json()["id"]
    status = f"/image/status/{job_id}"
    done = wait_finished(two.client, status, two.alice, lambda b: b.get("status") == "completed")
    assert two.client.get(status, headers=two.bob).status_code == 404
    assert two.client.get(f"/v1{status}", headers=two.bob).status_code == 404
    assert two.client.get(path_of(done["data"]["url"]), headers=two.bob).status_code == 404
    assert two.client.get(status, headers=two.admin).status_code == 200
