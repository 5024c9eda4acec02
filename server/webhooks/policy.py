"""Where webhooks may be sent: the SSRF policy, checked when a job is submitted and again at every delivery.

At submission (`check_webhook_url`, called by the dialects inside the request) the check needs no DNS: the scheme
(https, or http with `webhook_allow_http`), no credentials, a host, and a host that is an IP literal (in any notation
the resolver would accept, e.g. `127.1` or `2130706433`) or `localhost` must not be a refused address. A DNS lookup
there could hold the request for as long as the resolver hangs, and its answer would prove nothing anyway: DNS can
change before delivery. Callers that want the names checked too (off the event loop) pass a `resolver`.

At each delivery (`vet_target`) the host is resolved once, every address is checked with server/fetch.py's rules,
and the connection goes to that vetted address (DNS rebinding cannot swap in another).
"""

from __future__ import annotations

import ipaddress
import socket

import httpx

from server.errors import ApiError, FieldError
from server.fetch import (
    FetchError,
    FetchPolicy,
    FetchRefused,
    IPAddress,
    IPNetwork,
    Resolver,
    address_refusal,
    vet_url,
)
from server.settings import Settings

MAX_URL_CHARS = 2048
LOCALHOST_ADDRESSES = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


class TargetRefused(Exception):
    """The delivery target is not allowed (scheme, credentials, or an address the policy refuses)."""


def allowed_schemes(settings: Settings) -> tuple[str, ...]:
    return ("https", "http") if settings.webhook_allow_http else ("https",)


def allowed_networks(settings: Settings) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(str(n)) for n in settings.webhook_allowed_networks)


def literal_addresses(host: str) -> list[IPAddress] | None:
    """The addresses `host` stands for without asking DNS: an IP literal (also the legacy IPv4 forms getaddrinfo
    accepts: `127.1`, `0x7f.0.0.1`, `2130706433`), or localhost. None for a name that needs resolving."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return list(LOCALHOST_ADDRESSES)
    if all(c in "0123456789abcdefx." for c in name):  # possibly a legacy numeric IPv4 form
        try:
            return [ipaddress.IPv4Address(socket.inet_aton(name))]
        except OSError:
            return None
    return None


def _url_problem(url: str, settings: Settings, resolver: Resolver | None) -> str | None:
    if len(url) > MAX_URL_CHARS:
        return f"must be at most {MAX_URL_CHARS} characters"
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return "is not a valid URL"
    schemes = allowed_schemes(settings)
    if parsed.scheme not in schemes:
        need = " or ".join(f"{s}://" for s in schemes)
        hint = "" if settings.webhook_allow_http else " (this server does not send webhooks over plain http)"
        return f"must be an absolute {need} URL{hint}"
    if parsed.userinfo:
        return "must not contain credentials (user:password@)"
    if not parsed.host:
        return "has no host"
    networks = allowed_networks(settings)
    addresses = literal_addresses(parsed.host)
    if addresses is None and resolver is not None:
        try:
            addresses = resolver(parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80))
        except FetchError as e:
            return str(e)
    for addr in addresses or ():
        reason = address_refusal(addr, networks)
        if reason:
            return f"the host '{parsed.host}' is {reason}; this server does not send webhooks there"
    return None


def check_webhook_url(
    url: str | None, settings: Settings, field: str = "webhook_url", *, resolver: Resolver | None = None
) -> str | None:
    """A webhook URL the server may deliver to (stripped), None for None; else ApiError 422 naming `field`.
    No DNS lookup unless a `resolver` is given (see the module doc); delivery checks the resolved addresses again."""
    if url is None:
        return None
    url = url.strip()
    problem = _url_problem(url, settings, resolver)
    if problem:
        raise ApiError.invalid([FieldError(field, problem)])
    return url


def vet_target(url: str, settings: Settings, resolver: Resolver) -> tuple[httpx.URL, IPAddress]:
    """At delivery: the parsed URL and the vetted address to connect to; TargetRefused or FetchError (DNS)."""
    problem = _url_problem(url, settings, None)
    if problem:
        raise TargetRefused(f"webhook_url {problem}")
    parsed = httpx.URL(url)
    policy = FetchPolicy(max_bytes=0, timeout_s=settings.webhook_timeout_s, allowed_networks=allowed_networks(settings))
    try:
        return parsed, vet_url(parsed, policy, resolver)
    except FetchRefused as e:
        raise TargetRefused(str(e).replace("does not fetch from", "does not send webhooks to")) from None
