"""R5: on SIGTERM the server stops admitting, lets in-flight work run until `drain_timeout_s`, cancels the rest,
records every job, answers the synchronous calls still waiting, and exits 0.

A real `easel serve` of its own (the test kills it) on the demo models. At the signal one async job has completed,
one runs for minutes, three more wait behind it (two async, one synchronous). The job records are read straight from
the server's SQLite database afterwards, without restarting it: a restart would mark leftovers itself.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.jobs.store import JobStore
from tests.e2e.test_gateway_e2e import EaselProcess, poll
from tests.reliability.http_helpers import wait_running

pytestmark = pytest.mark.e2e

DRAIN_TIMEOUT_S = 4.0
EXIT_MARGIN_S = 30.0  # the running step stopping, the answers going out, the records written; a busy CPU
SLOW = {"width": 64, "height": 64, "steps": 100_000, "async": True}  # minutes of work unless cancelled
A1111_ASYNC = "/v2/automatic1111/sdapi/v1/txt2img"


def submit(client: httpx.Client, path: str, body: dict) -> str:
    r = client.post(path, json=body)
    assert r.status_code == 202, r.text
    return r.json()["task_address"]


def test_sigterm_drains_cancels_records_and_exits_zero(data_dir: Path, tmp_path: Path) -> None:
    own = tmp_path / "data"
    own.mkdir()
    (data_dir / "demo-models").mkdir(parents=True, exist_ok=True)
    (own / "demo-models").symlink_to(data_dir / "demo-models", target_is_directory=True)
    env = {"HF_HUB_OFFLINE": "1", "EASEL_MAX_STEPS": "100000", "EASEL_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S)}
    server = EaselProcess(own, env)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            quick = submit(
                client, A1111_ASYNC, {"prompt": "quick", "steps": 2, "width": 64, "height": 64, "async": True}
            )
            slow = submit(client, A1111_ASYNC, {"prompt": "slow", **SLOW})
            assert poll(client, quick)["status"] == "completed"
            wait_running(client, SLOW["steps"])
            queued = [
                submit(client, A1111_ASYNC, {"prompt": "queued", **SLOW, "steps": 50_000}),
                submit(
                    client, "/v2/image/flux/generate", {"prompt": "queued", "width": 64, "height": 64, "async": True}
                ),
            ]

        # A synchronous call waiting behind the slow job when the signal comes: it must get an answer.
        sync_answer: list[httpx.Response] = []

        def wait_synchronously() -> None:
            body = {"prompt": "sync", "steps": 3, "width": 64, "height": 64}
            sync_answer.append(httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120))

        waiter = threading.Thread(target=wait_synchronously)
        waiter.start()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            deadline = time.monotonic() + 30
            while client.get("/sdapi/v1/progress").json()["queued"] < 3:  # 2 async + the sync one wait
                assert time.monotonic() < deadline, "the synchronous call never reached the queue"
                time.sleep(0.05)

        assert server.proc is not None
        signalled = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new work once the signal is in: the listener is closed
            httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "late", "steps": 1}, timeout=5)

        code = server.proc.wait(DRAIN_TIMEOUT_S + EXIT_MARGIN_S)
        took = time.monotonic() - signalled
        waiter.join(30)
    finally:
        server.kill()

    assert code == 0, server.log.read_text()[-3000:]
    # The running job had minutes to go: the server waited for it until the drain deadline, not longer.
    assert DRAIN_TIMEOUT_S - 0.5 <= took <= DRAIN_TIMEOUT_S + EXIT_MARGIN_S, took
    # The synchronous caller was answered (the job was cancelled by the shutdown), not dropped.
    assert len(sync_answer) == 1
    answer = sync_answer[0]
    assert answer.status_code == 503 and "shut down" in answer.text, (answer.status_code, answer.text)
    assert int(answer.headers["Retry-After"]) > 0

    store = JobStore(f"sqlite:///{(own / 'easel.db').resolve()}")
    try:
        records = {r.task_address: r for r in store.list_jobs(limit=100)}
    finally:
        store.close()
    assert set(records) == {quick, slow, *queued}
    assert records[quick].status == "completed"
    for address in (slow, *queued):
        record = records[address]
        assert record.status in ("failed", "cancelled"), (record.status, record.error)
        assert record.error_code == "interrupted", record.error_code
        assert "shut down" in (record.error or "") or "shutdown" in (record.error or ""), record.error
        assert record.finished_at is not None
    assert not [r for r in records.values() if r.status in ("queued", "running")]
