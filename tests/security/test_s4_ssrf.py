"""S4: server-side fetches (image URLs now; webhooks will reuse server/fetch.py) refuse loopback, private, link-local
and metadata targets, however they are spelled, reached through redirects or DNS answers.

No packet leaves loopback: names are answered by stub resolvers or by `getaddrinfo` forced to numeric-only mode, and
the one real server is a loopback HTTP server this module starts (reachable only where a test allows 127.0.0.1).
tests/unit/test_fetch.py has the basic cases; this file adds the spellings, redirects and DNS answers, and the API.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.registry import load_registry
from server.app import create_app
from server.fetch import FetchError, FetchPolicy, FetchRefused, address_refusal, fetch
from server.settings import REPO_ROOT, Settings
from tests.api.fake_engine import FakeEngine

ip = ipaddress.ip_address
ONLY_127_0_0_1 = (ipaddress.ip_network("127.0.0.1/32"),)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, format="PNG")
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        Handler.hits.append(self.path)
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = png()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def numeric_dns_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """`getaddrinfo` may only turn numeric spellings into addresses (no lookup goes out); names fail."""
    real = socket.getaddrinfo

    def numeric(host: str, port: int, *args: object, **kwargs: object) -> list:
        kwargs["flags"] = socket.AI_NUMERICHOST
        return real(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", numeric)
    Handler.hits.clear()


def policy(allowed: tuple = ()) -> FetchPolicy:
    return FetchPolicy(max_bytes=100_000, timeout_s=5.0, max_redirects=3, allowed_networks=allowed)


# Address classification ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, reason",
    [
        ("fd00::1", "private"),  # unique local (fc00::/7)
        ("fd12:3456:789a::1", "private"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "metadata"),  # ECS task metadata
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:7f00:1", "loopback"),  # mapped, in hex
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:192.168.0.1", "private"),
        ("::127.0.0.1", "reserved"),  # IPv4-compatible (deprecated form)
        ("2002:a9fe:a9fe::", "metadata"),  # 6to4 of 169.254.169.254
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1
        ("0.1.2.3", "private"),  # "this network"
        ("192.0.0.1", "private"),  # IETF protocol assignments
        ("198.18.0.1", "private"),  # benchmarking
        ("192.0.2.1", "private"),  # documentation
    ],
)
def test_more_forbidden_addresses(address: str, reason: str) -> None:
    refusal = address_refusal(ip(address))
    assert refusal is not None and reason in refusal, refusal


# Spellings of 127.0.0.1 and 169.254.169.254 that are not dotted quads ------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/",  # 127.0.0.1 as one decimal number
        "http://0x7f000001/",  # hex
        "http://017700000001/",  # octal
        "http://0x7f.0.0.1/",
        "http://127.1/",  # short form
        "http://0/",  # 0.0.0.0
        "http://2852039166/latest/meta-data/",  # 169.254.169.254
        "http://0xa9fea9fe/latest/meta-data/",
        "http://0251.0376.0251.0376/latest/meta-data/",  # octal dotted
        "http://[::ffff:7f00:1]/",
        "http://[0:0:0:0:0:ffff:127.0.0.1]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://10.1/",
    ],
)
def test_numeric_spellings_of_forbidden_addresses_are_refused(url: str) -> None:
    with pytest.raises(FetchRefused):
        fetch(url, policy())  # the real resolver path: getaddrinfo turns the spelling into the address checked


# DNS answers and redirects --------------------------------------------------------------------------------------------


def test_a_dns_answer_with_a_private_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the default resolver: any name whose answer holds one internal address is refused, before
    connecting."""
    answers = {
        "images.example.com": ["10.0.0.7"],
        "cdn.example.com": ["93.184.216.34", "169.254.169.254"],
        "v6.example.com": ["::ffff:192.168.1.1"],
        "rebind.example.com": ["127.0.0.1"],
    }

    def stub(host: str, port: int, *args: object, **kwargs: object) -> list:
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in
                answers[host]]  # fmt: skip

    monkeypatch.setattr(socket, "getaddrinfo", stub)
    for host in answers:
        with pytest.raises(FetchRefused, match="resolves to"):
            fetch(f"http://{host}/a.png", policy())


def test_redirects_to_forbidden_targets_are_refused_at_the_hop(port: int) -> None:
    """The first hop is allowed (127.0.0.1 is listed); where it redirects to is checked again, and never fetched."""
    base = f"http://127.0.0.1:{port}"
    assert fetch(f"{base}/image", policy(ONLY_127_0_0_1)).startswith(b"\x89PNG")
    targets = [
        f"http://127.0.0.2:{port}/image",  # loopback, not the allowed address
        f"http://2130706434:{port}/image",  # the same, spelled as a number
        f"http://[::1]:{port}/image",
        f"http://[::ffff:7f00:2]:{port}/image",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_INFO",
    ]
    for target in targets:
        Handler.hits.clear()
        with pytest.raises(FetchRefused):
            fetch(f"{base}/redirect?to={target}", policy(ONLY_127_0_0_1))
        assert Handler.hits == [f"/redirect?to={target}"], target  # only the first hop reached a server


def test_redirect_to_a_name_that_resolves_inside_is_refused(port: int) -> None:
    names = {"first.test": "127.0.0.1", "internal.test": "10.0.0.5"}
    asked: list[str] = []

    def resolver(host: str, port: int) -> list:
        asked.append(host)
        return [ip(names[host])]

    Handler.hits.clear()
    with pytest.raises(FetchRefused, match="internal.test"):
        fetch(f"http://first.test:{port}/redirect?to=http://internal.test/x", policy(ONLY_127_0_0_1), resolver=resolver)
    assert asked == ["first.test", "internal.test"] and len(Handler.hits) == 1


def test_fetch_errors_are_client_errors() -> None:
    with pytest.raises(FetchError) as caught:
        fetch("http://169.254.169.254/", policy())
    assert 400 <= caught.value.status < 500


# Through the API ------------------------------------------------------------------------------------------------------


def test_gateway_image_urls_are_guarded(port: int, tmp_path: Path) -> None:
    registry = load_registry(REPO_ROOT / "models.yaml")
    engine = FakeEngine(registry)
    with TestClient(create_app(Settings(data_dir=tmp_path), engine=engine, registry=registry)) as client:
        for url in [
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            f"http://127.0.0.1:{port}/image",
            f"http://2130706433:{port}/image",
            f"http://[::ffff:127.0.0.1]:{port}/image",
            f"http://localhost.:{port}/image",  # a name: the numeric-only resolver cannot answer it
            "file:///etc/passwd",
        ]:
            r = client.post("/v2/image/qwen/edit", json={"prompt": "x", "image": url})
            assert r.status_code == 422, (url, r.text)
            error = r.json()["error"]
            assert error["field"] == "image", error
            if url.startswith("http"):
                assert error["code"] == "image_url_unusable", error
            assert "169.254" not in error["message"] or "169.254.169.254" in url  # no internal answers echoed
        assert Handler.hits == [] and engine.requests == []

    # The same loopback URL is fetched once its network is allowed: the refusals above were the guard's.
    settings = Settings(data_dir=tmp_path, fetch_allowed_networks=["127.0.0.1/32"])
    with TestClient(create_app(settings, engine=engine, registry=registry)) as client:
        r = client.post("/v2/image/qwen/edit", json={"prompt": "x", "image": f"http://127.0.0.1:{port}/image"})
        assert r.status_code == 200, r.text
    assert Handler.hits == ["/image"]
