"""server/fetch.py: the SSRF guard. Address classification is tested on IP values; real fetches go only to a loopback
server this test starts (allowed through `allowed_networks`). Nothing here sends a packet off loopback: every
refusal happens before a connection is opened, and the fake resolvers never hand out a public address to connect to.
"""

from __future__ import annotations

import gzip
import ipaddress
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from server.fetch import (
    FetchFailed,
    FetchPolicy,
    FetchRefused,
    FetchTooLarge,
    address_refusal,
    embedded_ipv4,
    fetch,
    vet_url,
)

ip = ipaddress.ip_address
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 100
GZIP_BOMB = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)  # ~64 KB on the wire, 64 MiB inflated


class Handler(BaseHTTPRequestHandler):
    hits: list[tuple[str, str]] = []

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        Handler.hits.append((self.path, self.headers.get("Host", "")))
        if self.path == "/image":
            self._send(200, PNG)
        elif self.path == "/host":
            self._send(200, self.headers.get("Host", "").encode())
        elif self.path in ("/gzip-bomb", "/gzip-image", "/deflate-image"):
            body = {
                "/gzip-bomb": GZIP_BOMB,
                "/gzip-image": gzip.compress(PNG),
                "/deflate-image": zlib.compress(PNG),
            }[self.path]
            self.send_response(200)
            self.send_header("Content-Encoding", "deflate" if self.path == "/deflate-image" else "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/brotli":
            self.send_response(200)
            self.send_header("Content-Encoding", "br")
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"\x0b\x00\x80\x03")
        elif self.path == "/declared-big":
            self.send_response(200)
            self.send_header("Content-Length", str(10_000_000))
            self.end_headers()
        elif self.path == "/streamed-big":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(64):
                chunk = b"y" * 1024
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"z")
                self.wfile.flush()
                time.sleep(0.05)
        elif self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"nope")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def policy(**overrides: object) -> FetchPolicy:
    values: dict = {"max_bytes": 10_000, "timeout_s": 5.0, "max_redirects": 3, "allowed_networks": LOOPBACK}
    return FetchPolicy(**{**values, **overrides})


def no_dns(host: str, port: int) -> list:
    raise AssertionError(f"unexpected DNS lookup of {host}")


# Classification -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback"),
        ("127.1.2.3", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "private"),  # reserved 240/4: Python lists it among the private networks too
        ("255.255.255.255", "private"),  # broadcast, likewise
        ("2001:db8::1", "private"),  # documentation
        ("100.64.0.1", "not a public address"),  # shared address space (CGNAT)
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: Python < 3.13 does not call this loopback itself
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 of 169.254.169.254
    ],
)
def test_forbidden_addresses_are_refused(address: str, reason: str) -> None:
    refusal = address_refusal(ip(address))
    assert refusal is not None and reason in refusal


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ip(address)) is None


def test_allow_list_permits_listed_networks_only() -> None:
    allowed = (ipaddress.ip_network("10.20.0.0/16"),)
    assert address_refusal(ip("10.20.1.2"), allowed) is None
    assert address_refusal(ip("10.21.1.2"), allowed) is not None
    assert address_refusal(ip("127.0.0.1"), LOOPBACK) is None
    assert address_refusal(ip("::1"), LOOPBACK) is not None  # an IPv4 network does not cover IPv6 loopback


def test_embedded_ipv4() -> None:
    assert embedded_ipv4(ip("::ffff:1.2.3.4")) == ip("1.2.3.4")
    assert embedded_ipv4(ip("2002:0102:0304::")) == ip("1.2.3.4")
    assert embedded_ipv4(ip("64:ff9b::0102:0304")) == ip("1.2.3.4")
    assert embedded_ipv4(ip("2606:4700::1111")) is None


# URL vetting (no connection) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://example.com/a.png", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http://user:pw@example.com/a.png", "credentials"),
        ("http://169.254.169.254/latest/meta-data", "metadata"),
        ("http://[::1]:80/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
    ],
)
def test_refused_before_any_connection(url: str, message: str) -> None:
    with pytest.raises(FetchRefused, match=message):
        fetch(url, policy(allowed_networks=()), resolver=no_dns)


def test_every_resolved_address_is_checked() -> None:
    """One private address among public ones is enough to refuse (a rebinding-style answer)."""

    def mixed(host: str, port: int) -> list:
        return [ip("93.184.216.34"), ip("10.0.0.5")]

    with pytest.raises(FetchRefused, match="private") as e:
        fetch("http://images.example/a.png", policy(allowed_networks=()), resolver=mixed)
    assert "10.0.0.5" not in str(e.value)  # internal DNS answers are not echoed to the client


def test_hosts_that_are_not_ip_literals_go_through_the_resolver() -> None:
    """E.g. `2130706433` (127.0.0.1 as one number) is no literal for ipaddress; the resolver's answer is checked."""
    asked: list[str] = []

    def resolver(host: str, port: int) -> list:
        asked.append(host)
        return [ip("127.0.0.1")]  # what getaddrinfo answers for it

    with pytest.raises(FetchRefused, match="loopback"):
        vet_url(httpx.URL("http://2130706433/"), policy(allowed_networks=()), resolver=resolver)
    assert asked == ["2130706433"]


def test_loopback_refused_without_allow_list(server: str) -> None:
    with pytest.raises(FetchRefused, match="loopback"):
        fetch(f"{server}/image", policy(allowed_networks=()), resolver=no_dns)


# Real fetches from the loopback server --------------------------------------------------------------------------------


def test_fetch_from_allowed_loopback(server: str) -> None:
    assert fetch(f"{server}/image", policy(), resolver=no_dns) == PNG


def test_connects_to_the_vetted_address_without_a_second_lookup(server: str) -> None:
    """The name is resolved once by our resolver; the request goes to that IP with the name in the Host header."""
    port = int(server.rsplit(":", 1)[1])
    lookups: list[str] = []

    def once(host: str, port: int) -> list:
        lookups.append(host)
        return [ip("127.0.0.1")]

    body = fetch(f"http://images.invalid:{port}/host", policy(), resolver=once)
    assert body == f"images.invalid:{port}".encode()  # `.invalid` never resolves for real: the pinned IP was used
    assert lookups == ["images.invalid"]


def test_size_cap_from_content_length(server: str) -> None:
    with pytest.raises(FetchTooLarge, match="10000000 bytes"):
        fetch(f"{server}/declared-big", policy(), resolver=no_dns)


def test_size_cap_while_streaming(server: str) -> None:
    with pytest.raises(FetchTooLarge, match="larger than the limit"):
        fetch(f"{server}/streamed-big", policy(max_bytes=8 * 1024), resolver=no_dns)


def test_gzip_bomb_counts_decoded_bytes_as_it_inflates(server: str) -> None:
    """64 MiB of zeros in ~64 KB of gzip against a 1 MB cap: refused having inflated about the cap, not 64 MiB
    (httpx's own decoding inflates each network chunk whole)."""
    assert len(GZIP_BOMB) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(FetchTooLarge, match="larger than the limit"):
            fetch(f"{server}/gzip-bomb", policy(max_bytes=1_000_000), resolver=no_dns)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB while refusing a 1 MB cap"


def test_compressed_images_are_inflated(server: str) -> None:
    assert fetch(f"{server}/gzip-image", policy(), resolver=no_dns) == PNG
    assert fetch(f"{server}/deflate-image", policy(), resolver=no_dns) == PNG
    with pytest.raises(FetchFailed, match="unsupported Content-Encoding"):
        fetch(f"{server}/brotli", policy(), resolver=no_dns)


def test_timeout(server: str) -> None:
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="longer than|timed out"):
        fetch(f"{server}/slow", policy(timeout_s=0.5), resolver=no_dns)
    assert time.monotonic() - started < 10  # generous: a loaded CI machine runs late; no timeout would hang


def test_http_error_status(server: str) -> None:
    with pytest.raises(FetchFailed, match="HTTP 404"):
        fetch(f"{server}/missing", policy(), resolver=no_dns)


def test_redirects_are_followed_and_each_hop_vetted(server: str) -> None:
    assert fetch(f"{server}/redirect?to=/image", policy(), resolver=no_dns) == PNG
    Handler.hits.clear()
    with pytest.raises(FetchRefused, match="metadata"):
        fetch(f"{server}/redirect?to=http://169.254.169.254/latest", policy(), resolver=no_dns)
    assert [path for path, _ in Handler.hits] == ["/redirect?to=http://169.254.169.254/latest"]  # never followed


def test_redirect_limit(server: str) -> None:
    chain = f"{server}/redirect?to=/redirect?to=/image"
    assert fetch(chain, policy(max_redirects=2), resolver=no_dns) == PNG
    with pytest.raises(FetchRefused, match="more than 1 redirect"):
        fetch(chain, policy(max_redirects=1), resolver=no_dns)


def test_unresolvable_host() -> None:
    def nothing(host: str, port: int) -> list:
        return []

    with pytest.raises(FetchFailed, match="could not be resolved"):
        fetch("http://nowhere.invalid/a.png", policy(), resolver=nothing)
