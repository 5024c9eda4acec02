"""R3: a client that hangs up on a synchronous call cancels its job; an async job keeps running to completion.

In process first: the ASGI app with the fake engine, a raw `receive` that sends `http.disconnect` while the job
runs. Then a real `easel serve` on the demo models: the slow jobs would run for minutes (1000+ steps); each
synchronous call is sent over a raw socket that the test closes once the job runs on the engine, and the job must
then end `cancelled` within seconds. Covered: the A1111 route (`generation.run`), the gateway (`run_job`) and a
dialect that waits with `run_to_completion` (IndoxHub).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from pipelines.registry import load_registry
from server.app import create_app
from server.jobs.db import JobRecord
from server.jobs.store import JobStore
from server.settings import REPO_ROOT, Settings
from tests.api.fake_engine import FakeEngine
from tests.e2e.test_gateway_e2e import EaselProcess
from tests.reliability.http_helpers import post_scope, wait_running

SLOW_STEPS = 1000  # ModelDefaults' maximum; every dialect that takes its steps from models.yaml runs this many
CANCEL_WITHIN_S = 20.0  # generous: CPU shared with other work; uncancelled, these jobs run for minutes


SYNC_CALLS = [
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 5, "width": 64, "height": 64}),  # a1111 generation.run
    ("/v2/image/flux/generate", {"prompt": "x", "width": 64, "height": 64}),  # gateway run_job
    ("/api/v1/images/generations", {"prompt": "x", "size": "64x64"}),  # run_to_completion (IndoxHub)
    ("/v1/images/generations", {"prompt": "x", "size": "64x64"}),  # OpenAI
    ("/v1/generate", {"prompt": "x", "width": 512, "height": 512, "quality": "standard"}),  # GenPicz
]


async def call_and_hang_up(app: object, engine: FakeEngine, path: str, body: dict, hang_up: bool) -> list[dict]:
    """One ASGI request: the body, then (`hang_up`) `http.disconnect` as soon as its job runs. The messages sent."""
    data = json.dumps(body).encode()
    scope = post_scope(path, len(data), host="test")
    pending = [{"type": "http.request", "body": data, "more_body": False}]
    sent: list[dict] = []
    answered = asyncio.Event()

    async def receive() -> dict:
        if pending:
            return pending.pop(0)
        if not hang_up:
            await answered.wait()  # what a server does for a client that stays: nothing until the answer is out
            return {"type": "http.disconnect"}
        while engine.current_job() is None:
            await asyncio.sleep(0.005)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    # A job cancelled at its first step ends at once: a call that hung up and still waits was not cancelled.
    await asyncio.wait_for(app(scope, receive, send), 10 if hang_up else 30)  # type: ignore[operator]
    return sent


@pytest.mark.parametrize("path, body", SYNC_CALLS)
def test_a_disconnect_cancels_the_job_of_a_synchronous_call(path: str, body: dict, tmp_path: Path) -> None:
    registry = load_registry(REPO_ROOT / "models.yaml")
    engine = FakeEngine(registry)
    engine.block()  # every job waits at its first step: only a cancel (or release) ends it
    app = create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry)
    jobs: list = []

    def record_job() -> None:
        jobs.append(engine.wait_for_running())

    watcher = threading.Thread(target=record_job)
    watcher.start()
    asyncio.run(call_and_hang_up(app, engine, path, body, hang_up=True))
    watcher.join(10)
    assert len(jobs) == 1 and jobs[0].cancel_requested, "the job of a client that hung up was not cancelled"

    engine.release()  # a client that stays: its job is never cancelled and it gets its answer
    sent = asyncio.run(call_and_hang_up(app, engine, path, body, hang_up=False))
    assert sent[0]["status"] == 200, sent
    assert engine.current_job() is None


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EaselProcess]:
    own = tmp_path_factory.mktemp("r3-data")
    (data_dir / "demo-models").mkdir(parents=True, exist_ok=True)
    (own / "demo-models").symlink_to(data_dir / "demo-models", target_is_directory=True)
    # The repo's registry with slow defaults for the models the gateway's flux route and IndoxHub use.
    registry = yaml.safe_load((REPO_ROOT / "models.yaml").read_text())
    for model_id in ("demo-flux", "demo-sdxl"):
        registry["models"][model_id]["defaults"]["steps"] = SLOW_STEPS
    models = own / "models.yaml"
    models.write_text(yaml.safe_dump(registry))
    env = {"HF_HUB_OFFLINE": "1", "EASEL_MODELS": str(models), "EASEL_MAX_STEPS": "100000"}
    proc = EaselProcess(own, env)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def client(server: EaselProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def send_and_keep_open(server: EaselProcess, path: str, body: dict) -> socket.socket:
    """POST `body` and leave the connection open without reading the answer (the caller closes it)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b""
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(body)


def wait_idle(client: httpx.Client, timeout: float) -> float:
    """Seconds until the engine has no job left (A1111 /progress: job_count 0)."""
    started = time.monotonic()
    while client.get("/sdapi/v1/progress").json()["state"]["job_count"] != 0:
        assert time.monotonic() - started < timeout, "the job is still running after its client hung up"
        time.sleep(0.05)
    return time.monotonic() - started


def newest_record(server: EaselProcess, dialect: str) -> JobRecord:
    store = JobStore(f"sqlite:///{(server.data_dir / 'easel.db').resolve()}")
    try:
        records = store.list_jobs(dialect=dialect, limit=1)
    finally:
        store.close()
    assert records, f"no {dialect} job recorded"
    return records[0]


def wait_finished(server: EaselProcess, dialect: str, timeout: float) -> JobRecord:
    deadline = time.monotonic() + timeout
    while (record := newest_record(server, dialect)).status in ("queued", "running"):
        assert time.monotonic() < deadline, f"{dialect} job still {record.status} after its client hung up"
        time.sleep(0.1)
    return record


@pytest.mark.e2e
def test_a1111_sync_call_is_cancelled_when_its_client_hangs_up_but_an_async_job_is_not(
    server: EaselProcess, client: httpx.Client
) -> None:
    slow = {"prompt": "slow", "steps": 100_000, "width": 64, "height": 64}
    sync_socket = send_and_keep_open(server, "/sdapi/v1/txt2img", slow)
    try:
        wait_running(client, 100_000)
        # An async job queued behind it; its client hangs up as soon as it has the task address.
        async_socket = send_and_keep_open(
            server,
            "/v2/automatic1111/sdapi/v1/txt2img",
            {"prompt": "kept", "steps": 3, "width": 64, "height": 64, "async": True},
        )
        status, accepted = read_response(async_socket)
        async_socket.close()
        assert status == 202, accepted
        task_address = accepted["task_address"]
        assert client.get(f"/v2/tasks/{task_address}").json()["status"] == "queued"  # behind the slow job
    finally:
        sync_socket.close()

    # The slow job stops within seconds (it had minutes to go), and the async job then runs to completion.
    deadline = time.monotonic() + CANCEL_WITHIN_S + 60
    while (task := client.get(f"/v2/tasks/{task_address}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"async job still {task['status']}: the slow job was not cancelled?"
        time.sleep(0.1)
    assert task["status"] == "completed", task
    assert len(task["result"]["images"]) == 1


@pytest.mark.e2e
def test_gateway_sync_call_is_cancelled_when_its_client_hangs_up(server: EaselProcess, client: httpx.Client) -> None:
    sock = send_and_keep_open(server, "/v2/image/flux/generate", {"prompt": "slow", "width": 64, "height": 64})
    try:
        wait_running(client, SLOW_STEPS)
        assert newest_record(server, "gateway").status in ("queued", "running")
    finally:
        sock.close()
    hung_up = time.monotonic()
    record = wait_finished(server, "gateway", CANCEL_WITHIN_S)
    assert (record.status, record.error_code) == ("cancelled", "cancelled")
    assert record.finished_at is not None and time.monotonic() - hung_up < CANCEL_WITHIN_S
    wait_idle(client, CANCEL_WITHIN_S)


@pytest.mark.e2e
def test_run_to_completion_dialect_is_cancelled_when_its_client_hangs_up(
    server: EaselProcess, client: httpx.Client
) -> None:
    sock = send_and_keep_open(server, "/api/v1/images/generations", {"prompt": "slow", "size": "64x64"})
    try:
        wait_running(client, SLOW_STEPS)
    finally:
        sock.close()
    record = wait_finished(server, "indoxhub", CANCEL_WITHIN_S)
    assert (record.status, record.error_code) == ("cancelled", "cancelled")
    wait_idle(client, CANCEL_WITHIN_S)


@pytest.mark.e2e
def test_a_client_that_stays_gets_its_images(server: EaselProcess, client: httpx.Client) -> None:
    """The watcher cancels only on a real hang-up: a client that waits gets the answer."""
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "quick", "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
