"""Per-key isolation (issue #5): on every job route of every dialect, another key's job answers 404 (listing, status,
result URLs, delete, cancel, A1111 progress and interrupt); its owner and an admin key see it."""

from __future__ import annotations

import base64
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
    URL itself is a capability anyone handed it may load (tests/security/test_s13_result_links.py)."""
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


# A1111 sessions (issue #14): with keys, options are per key; the server-wide ones belong to admins -----------------

SMALL_A1111 = {"prompt": "a fox", "steps": 1, "width": 64, "height": 64}


def checkpoint(client: TestClient, headers: dict[str, str]) -> str:
    return client.get("/sdapi/v1/options", headers=headers).json()["sd_model_checkpoint"]


def test_a_keys_model_and_options_touch_nobody_else(two: Two) -> None:
    c = two.client
    assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "demo-flux", "samples_format": "jpg"},
                  headers=two.alice).status_code == 200  # fmt: skip
    assert checkpoint(c, two.alice).startswith("demo-flux")
    for other in (two.bob, two.admin):
        assert checkpoint(c, other).startswith("demo-sd15")
        assert c.get("/sdapi/v1/options", headers=other).json()["samples_format"] == "png"
    # Each key's generations use its own session: alice's model and format, bob's the server's.
    two.engine.requests.clear()
    alice = c.post("/sdapi/v1/txt2img", json=SMALL_A1111, headers=two.alice).json()
    bob = c.post("/sdapi/v1/txt2img", json=SMALL_A1111, headers=two.bob).json()
    assert [r.model for r in two.engine.requests] == ["demo-flux", "demo-sd15"]
    assert base64.b64decode(alice["images"][0])[:3] == b"\xff\xd8\xff"  # JPEG
    assert base64.b64decode(bob["images"][0])[:8] == b"\x89PNG\r\n\x1a\n"
    # override_settings kept (restore_afterwards false) go to the caller's session too.
    body = {**SMALL_A1111, "override_settings": {"jpeg_quality": 55}, "override_settings_restore_afterwards": False}
    assert c.post("/sdapi/v1/txt2img", json=body, headers=two.bob).status_code == 200
    assert c.get("/sdapi/v1/options", headers=two.bob).json()["jpeg_quality"] == 55
    assert c.get("/sdapi/v1/options", headers=two.alice).json()["jpeg_quality"] == 80


def test_admins_change_the_server_wide_defaults(two: Two) -> None:
    c = two.client
    c.post("/sdapi/v1/options", json={"samples_format": "webp"}, headers=two.alice)  # alice's own value
    assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "demo-sdxl", "samples_format": "jpg",
                                             "jpeg_quality": 70}, headers=two.admin).status_code == 200  # fmt: skip
    # Keys without their own value see the new defaults; alice keeps the value she set.
    assert checkpoint(c, two.bob).startswith("demo-sdxl")
    assert c.get("/sdapi/v1/options", headers=two.bob).json()["samples_format"] == "jpg"
    alice = c.get("/sdapi/v1/options", headers=two.alice).json()
    assert alice["samples_format"] == "webp" and alice["jpeg_quality"] == 70


def test_sessions_are_kept_in_the_database(tmp_path: Path, registry: Registry) -> None:
    settings = Settings(data_dir=tmp_path)
    app = create_app(settings, engine=FakeEngine(registry), registry=registry)
    with TestClient(app) as client:
        key = app.state.keys.create("alice")
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "demo-flux", "eta_ddim": 0.5},
                    headers=bearer(key))  # fmt: skip
    app = create_app(settings, engine=FakeEngine(registry), registry=registry)  # a restart
    with TestClient(app) as client:
        options = client.get("/sdapi/v1/options", headers=bearer(key)).json()
        assert options["sd_model_checkpoint"].startswith("demo-flux") and options["eta_ddim"] == 0.5


ADMIN_ONLY = ("/refresh-checkpoints", "/refresh-loras", "/unload-checkpoint", "/reload-checkpoint")


def test_server_wide_actions_are_for_admins(two: Two) -> None:
    for path in ADMIN_ONLY:
        for prefix in ("/sdapi/v1", "/v2/automatic1111/sdapi/v1"):
            r = two.client.post(prefix + path, headers=two.bob)
            assert r.status_code == 403, (path, r.text)
            body = r.json()
            assert set(body) == {"error", "detail", "body", "errors"} and "admin" in body["detail"]  # A1111's shape
        assert two.client.post("/sdapi/v1" + path, headers=two.admin).status_code == 200, path
    assert two.engine.loaded  # the admin's reload did load


def test_basic_users_have_own_sessions_and_admins_by_name(tmp_path: Path, registry: Registry) -> None:
    import base64 as b64

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + b64.b64encode(f"{user}:{password}".encode()).decode()}

    settings = Settings(data_dir=tmp_path, api_auth="ann:pw1,ben:pw2", api_auth_admins="ben")
    with TestClient(create_app(settings, engine=FakeEngine(registry), registry=registry)) as client:
        ann, ben = basic("ann", "pw1"), basic("ben", "pw2")
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "demo-flux"}, headers=ann)
        assert checkpoint(client, ann).startswith("demo-flux") and checkpoint(client, ben).startswith("demo-sd15")
        assert client.post("/sdapi/v1/unload-checkpoint", headers=ann).status_code == 403
        assert client.post("/sdapi/v1/unload-checkpoint", headers=ben).status_code == 200
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "demo-sdxl"}, headers=ben)  # server-wide
        assert checkpoint(client, ann).startswith("demo-flux")


def test_cmd_flags_show_paths_to_admins_only(two: Two) -> None:
    bob = two.client.get("/sdapi/v1/cmd-flags", headers=two.bob).json()
    admin = two.client.get("/sdapi/v1/cmd-flags", headers=two.admin).json()
    for name in ("data_dir", "models", "styles"):
        assert admin[name] and "/" in admin[name]
        assert bob[name] is None, name
    assert not [v for v in bob.values() if isinstance(v, str) and v.startswith("/")]


def test_progress_counts_only_the_callers_own_queued_jobs(two: Two) -> None:
    import threading

    two.engine.block()
    threads = [
        threading.Thread(
            target=two.client.post, args=("/sdapi/v1/txt2img",), kwargs={"json": SMALL_A1111, "headers": two.alice}
        )  # fmt: skip
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    two.engine.wait_for_running()
    deadline = time.monotonic() + 10
    while two.client.get("/sdapi/v1/progress", headers=two.admin).json()["queued"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert two.client.get("/sdapi/v1/progress", headers=two.alice).json()["queued"] == 2
    assert two.client.get("/sdapi/v1/progress", headers=two.bob).json()["queued"] == 0
    two.engine.release()
    for t in threads:
        t.join(10)


def test_a_damaged_stored_session_falls_back_to_the_defaults(two: Two) -> None:
    """Rows written before the checks (or by hand): bad values, a checkpoint that is gone, JSON that is no object."""
    from sqlalchemy import text

    c = two.client
    c.post("/sdapi/v1/options", json={"eta_ddim": 0.5}, headers=two.alice)
    c.post("/sdapi/v1/options", json={"eta_ddim": 0.5}, headers=two.bob)
    engine = c.app.state.jobs.store.engine
    bad = '{"jpeg_quality": "high", "samples_format": "jpg", "img2img_background_color": "nope", "n_rows": []}'
    alice, bob = (c.get("/v1/account", headers=h).json()["key_id"] for h in (two.alice, two.bob))
    with engine.begin() as conn:
        conn.execute(text("UPDATE a1111_sessions SET options = :o, checkpoint = 'gone' WHERE owner = :k"),
                     {"o": bad, "k": alice})  # fmt: skip
        conn.execute(text("UPDATE a1111_sessions SET options = '[1, 2]' WHERE owner = :k"), {"k": bob})
    for headers in (two.alice, two.bob):
        r = c.post("/sdapi/v1/txt2img", json={**SMALL_A1111, "batch_size": 2}, headers=headers)
        assert r.status_code == 200, r.text
        options = c.get("/sdapi/v1/options", headers=headers).json()
        assert options["sd_model_checkpoint"].startswith("demo-sd15") and options["jpeg_quality"] == 80
