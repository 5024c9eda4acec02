"""S9: a client that never finishes its request headers (slowloris) is dropped after `header_timeout_s`, with
`easel serve`'s own uvicorn configuration (server.cli.uvicorn_config), on loopback, with a raw socket."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI

from server.cli import uvicorn_config
from server.http_protocol import HeaderDeadlineProtocol
from server.settings import Settings
from tests.conftest import free_port

TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"ok": "yes"}

    settings = Settings(host="127.0.0.1", port=free_port(), header_timeout_s=TIMEOUT_S)
    config = uvicorn_config(app, settings, "warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield settings.port
    server.should_exit = True
    thread.join(10)


def closed_after(sock: socket.socket, dribble: bytes | None, limit_s: float = 10.0) -> float:
    """Seconds until the server closes `sock`, sending `dribble` every 0.2 s meanwhile (each byte used to reset
    uvicorn's timer)."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < limit_s:
        try:
            if dribble:
                sock.sendall(dribble)
            if sock.recv(1024) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    raise AssertionError(f"the connection was still open after {limit_s} s")


def test_serve_uses_the_header_deadline_protocol() -> None:
    config = uvicorn_config(FastAPI(), Settings(header_timeout_s=7))
    assert issubclass(config.http, HeaderDeadlineProtocol) and config.http.header_timeout_s == 7


def test_dribbled_headers_are_cut_off(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        elapsed = closed_after(sock, b"X-A: b\r\n"[:1])
    assert TIMEOUT_S * 0.8 <= elapsed < TIMEOUT_S + 5  # generous: a loaded machine runs timers late


def test_silent_connection_is_cut_off(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        elapsed = closed_after(sock, None)
    assert elapsed < TIMEOUT_S + 5


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body): a single recv may return only part of it, leaving the
    rest to be read as if it were the next response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "connection closed mid-body"
        body += chunk
    return head


def test_complete_requests_are_served_and_kept_alive_connections_get_a_fresh_deadline(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        time.sleep(TIMEOUT_S * 0.6)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(TIMEOUT_S * 0.6)  # past the first deadline, within the one the response re-armed
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
