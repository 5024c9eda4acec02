"""Fetch an image from a client-supplied URL without opening a door into the server's own network (SSRF).

- only http and https, no credentials in the URL;
- the host is resolved once and EVERY address it resolves to is checked: loopback, private, link-local, multicast,
  reserved, unspecified, shared (CGNAT) and cloud metadata addresses are refused, including IPv4 addresses embedded
  in IPv6 (IPv4-mapped, 6to4, Teredo, NAT64), unless `allowed_networks` contains them;
- the connection goes to the vetted address (the URL's host stays in the Host header and TLS SNI, and the certificate
  is checked against it), so a second DNS answer cannot swap in another address (DNS rebinding);
- redirects are followed by hand, each hop vetted again, at most `max_redirects`;
- the body is streamed with a byte cap and an overall deadline; proxies from the environment are ignored;
- a compressed body (gzip, deflate) is inflated here, never more than the cap at a time, and its decoded bytes count
  against the cap as they come: httpx would inflate each network chunk whole (a 290 KB gzip response briefly
  cost 106 MiB).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[IPAddress]]

# Instance metadata services: AWS/GCP/Azure/OpenStack (v4 and AWS's v6), Alibaba, ECS task metadata.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
DEFAULT_PORTS = {"http": 80, "https": 443}
_dns_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="easel-dns")


class FetchError(Exception):
    """The URL could not be used; `status` is the HTTP status to answer the client with."""

    status = 422


class FetchRefused(FetchError):
    """Refused before connecting (scheme, address, redirects)."""


class FetchTooLarge(FetchError):
    status = 413


class FetchFailed(FetchError):
    """Tried and failed: DNS, connection, timeout, HTTP status."""


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    timeout_s: float
    max_redirects: int = 3
    allowed_networks: Sequence[IPNetwork] = field(default_factory=tuple)


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def address_refusal(addr: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """Why the server must not connect to `addr` (e.g. "a loopback address"), or None if it may."""
    if any(addr.version == net.version and addr in net for net in allowed):
        return None
    if addr in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(addr, ipaddress.IPv6Address):
        inner = embedded_ipv4(addr)
        if inner is not None:
            reason = address_refusal(inner, allowed)
            return f"{reason} (embedded in an IPv6 address)" if reason else None
    checks = (
        (addr.is_unspecified, "an unspecified address"),
        (addr.is_loopback, "a loopback address"),
        (addr.is_link_local, "a link-local address"),
        (addr.is_multicast, "a multicast address"),
        (addr.is_private, "a private address"),
        (addr.is_reserved, "a reserved address"),
        (not addr.is_global, "not a public address"),  # e.g. 100.64.0.0/10 (shared/CGNAT)
    )
    return next((reason for hit, reason in checks if hit), None)


def system_resolver(timeout_s: float) -> Resolver:
    """getaddrinfo with a deadline (the OS resolver has none of its own)."""

    def resolve(host: str, port: int) -> list[IPAddress]:
        future = _dns_pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise FetchFailed(f"resolving '{host}' timed out") from None
        except (socket.gaierror, UnicodeError):
            raise FetchFailed(f"the host '{host}' could not be resolved") from None
        addresses: list[IPAddress] = []
        for info in infos:
            addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone id
            if addr not in addresses:
                addresses.append(addr)
        return addresses

    return resolve


def vet_url(url: httpx.URL, policy: FetchPolicy, resolver: Resolver) -> IPAddress:
    """Check scheme and every address of the host; the address to connect to."""
    if url.scheme not in DEFAULT_PORTS:
        raise FetchRefused("only http and https URLs can be fetched")
    if url.userinfo:
        raise FetchRefused("URLs with credentials are not fetched")
    host = url.host
    if not host:
        raise FetchRefused("the URL has no host")
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = resolver(host, url.port or DEFAULT_PORTS[url.scheme])
    if not addresses:
        raise FetchFailed(f"the host '{host}' could not be resolved")
    for addr in addresses:
        reason = address_refusal(addr, policy.allowed_networks)
        if reason:
            # The address itself is not echoed: the error must not map the server's internal DNS for a client.
            raise FetchRefused(f"the host '{host}' resolves to {reason}, which this server does not fetch from")
    return addresses[0]


def fetch(
    url: str,
    policy: FetchPolicy,
    *,
    resolver: Resolver | None = None,
) -> bytes:
    """GET `url` under `policy`; the body, or a FetchError saying why not."""
    resolver = resolver or system_resolver(policy.timeout_s)
    deadline = time.monotonic() + policy.timeout_s
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise FetchRefused("not a valid URL") from None
    for _ in range(policy.max_redirects + 1):
        address = vet_url(current, policy, resolver)
        # A client per hop: a pooled connection verified for one host name must not carry a request for another.
        with httpx.Client(trust_env=False, follow_redirects=False, timeout=httpx.Timeout(policy.timeout_s)) as client:
            outcome = _get_once(client, current, address, policy, deadline)
        if isinstance(outcome, bytes):
            return outcome
        try:
            current = current.join(outcome)
        except (httpx.InvalidURL, ValueError):
            raise FetchFailed("the server answered with an invalid redirect") from None
    raise FetchRefused(f"more than {policy.max_redirects} redirect(s)")


def _get_once(
    client: httpx.Client, url: httpx.URL, address: IPAddress, policy: FetchPolicy, deadline: float
) -> bytes | str:
    """One GET to the vetted address: the body, or the Location of a redirect."""
    headers = {
        "Host": url.netloc.decode("ascii"),
        "Accept": "image/*",
        "Accept-Encoding": ACCEPT_ENCODING,
        "User-Agent": "easel-image-fetch",
    }
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    request = client.build_request("GET", url.copy_with(host=str(address)), headers=headers, extensions=extensions)
    try:
        response = client.send(request, stream=True)
    except httpx.TimeoutException:
        raise FetchFailed(f"fetching the URL timed out after {policy.timeout_s:g} s") from None
    except httpx.HTTPError as e:
        raise FetchFailed(f"the URL could not be fetched ({type(e).__name__})") from None
    try:
        if response.is_redirect:
            location = response.headers.get("location")
            if not location:
                raise FetchFailed("the server answered with a redirect without a Location")
            return location
        if response.status_code != 200:
            raise FetchFailed(f"the URL answered HTTP {response.status_code}")
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > policy.max_bytes:
            raise FetchTooLarge(f"the image at the URL is {length} bytes; the limit is {policy.max_bytes}")
        return _read_capped(response, policy, deadline)
    finally:
        response.close()


ACCEPT_ENCODING = "gzip, deflate"  # what CappedDecoder inflates; br/zstd are not asked for


class CappedDecoder:
    """Inflates a Content-Encoding as the raw bytes arrive, producing at most `limit + 1` bytes in all: each
    zlib call is told how much room is left, so a compression bomb is refused before it is inflated."""

    def __init__(self, content_encoding: str, limit: int):
        encodings = [e.strip().lower() for e in content_encoding.split(",") if e.strip()]
        encodings = [e for e in encodings if e != "identity"]
        if len(encodings) > 1:
            raise FetchFailed(f"the URL answered with stacked encodings '{content_encoding}'")
        self.limit = limit
        self.body = bytearray()
        encoding = encodings[0] if encodings else None
        if encoding is None:
            self._inflater = None
        elif encoding in ("gzip", "x-gzip"):
            self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._inflater = zlib.decompressobj()
        else:
            raise FetchFailed(f"the URL answered with an unsupported Content-Encoding '{encoding}'")

    def _add(self, data: bytes) -> None:
        self.body.extend(data)
        if len(self.body) > self.limit:
            raise FetchTooLarge(f"the image at the URL is larger than the limit of {self.limit} bytes")

    def feed(self, raw: bytes) -> None:
        if self._inflater is None:
            self._add(raw)
            return
        data = raw
        try:
            while data and not self._inflater.eof:
                self._add(self._inflater.decompress(data, self.limit + 1 - len(self.body)))
                data = self._inflater.unconsumed_tail
        except zlib.error:
            raise FetchFailed("the URL's compressed body is corrupt") from None

    def finish(self) -> bytes:
        if self._inflater is not None:
            try:
                self._add(self._inflater.flush(self.limit + 1 - len(self.body)))
            except zlib.error:
                raise FetchFailed("the URL's compressed body is corrupt") from None
        return bytes(self.body)


def _read_capped(response: httpx.Response, policy: FetchPolicy, deadline: float) -> bytes:
    decoder = CappedDecoder(response.headers.get("content-encoding", ""), policy.max_bytes)
    try:
        for chunk in response.iter_raw():  # undecoded: CappedDecoder inflates within the cap
            decoder.feed(chunk)
            if time.monotonic() > deadline:
                raise FetchFailed(f"fetching the URL took longer than {policy.timeout_s:g} s")
    except httpx.TimeoutException:
        raise FetchFailed(f"fetching the URL timed out after {policy.timeout_s:g} s") from None
    except httpx.HTTPError as e:
        raise FetchFailed(f"the URL could not be fetched ({type(e).__name__})") from None
    return decoder.finish()
