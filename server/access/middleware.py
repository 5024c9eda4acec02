"""Authentication and per-key rate limiting for every route of every dialect, before any body is read.

- Health probes and the API docs stay open.
- With no key configured (and no A1111 `api_auth`) the server runs open; `easel serve` refuses that on a
  non-loopback address unless `--insecure-no-auth` is given (see server.cli).
- `Authorization: Bearer <key>` everywhere; HTTP Basic (A1111's `--api-auth user:pass,...`) on A1111 routes.
- A keyed request is counted against its key's per-minute limit, a Basic user's against `api_auth_rate_limit`; every
  answer to it carries X-RateLimit-Limit, -Remaining and -Reset, and over the limit it is a 429 with Retry-After in
  the dialect's error shape.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable

from anyio import to_thread
from fastapi.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.access.config import BasicUsers
from server.access.keys import KeyStore
from server.access.principal import Principal, basic_principal, key_principal
from server.access.ratelimit import RateDecision, RateLimiter
from server.errors import A1111_PREFIXES, ErrorInfo, renderer_for

# The studio page (`/`, `/studio`: server.studio) is open too: it holds no data, and asks for a key for every call.
OPEN_PATHS = frozenset(
    {"/livez", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/", "/studio"}
)
# The API pages' own scripts and styles (server.app.DOCS_ASSETS_PATH), the studio page's, and the style presets'
# example thumbnails (server.thumbnails: public pictures of a fixed prompt, one per style, made once).
OPEN_PREFIXES = ("/docs-assets/", "/studio-assets/", "/v1/style-thumbnails/")


def _has_route(scope: Scope) -> bool:
    """Whether any route of the app answers this path (with any method)."""
    router = getattr(scope.get("app"), "router", None)
    routes = getattr(router, "routes", None)
    if routes is None:
        return True  # no route table to ask: treat it as known, so credentials are checked
    return any(route.matches(scope)[0] != Match.NONE for route in routes)


class AccessControl:
    def __init__(
        self,
        app: ASGIApp,
        keys: Callable[[], KeyStore],
        limiter: Callable[[], RateLimiter],
        basic_users: BasicUsers,
        basic_rate_limit: int,
        signed_results_prefix: str | None = None,
    ):
        self.app = app
        # Result URLs carrying a signature are capabilities: they pass without credentials, and the results route
        # checks the signature, the expiry, the generation and its key (server.jobs.links). None: turned off.
        self.signed_results_prefix = signed_results_prefix
        self._keys = keys  # factories: the stores open the database lazily, once the app has started
        self._limiter = limiter
        self.basic_users = basic_users.passwords
        self.basic_admins = basic_users.admins
        self.basic_rate_limit = basic_rate_limit
        # Keys are revoked, never deleted: once one exists the server stays locked, so that answer is kept (an open
        # server asks on each request, since `easel keys create` may run in another process meanwhile).
        self._locked = bool(basic_users.passwords)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in OPEN_PATHS
            or scope["path"].startswith(OPEN_PREFIXES)
            or scope["method"] == "OPTIONS"
        ):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if self._capability(scope):
            scope.setdefault("state", {})["capability"] = True
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        a1111 = path.startswith(A1111_PREFIXES)
        if a1111 and not _has_route(scope):
            # A1111 checks credentials per route, so a path it does not have is a 404 (with or without them): the
            # route table is public anyway (/openapi.json).
            await self.app(scope, receive, send)
            return

        principal = await to_thread.run_sync(self._authenticate, authorization, a1111)
        if principal is False:
            await self._refuse(scope, receive, send, self._unauthorized(path, authorization, a1111))
            return
        scope.setdefault("state", {})["principal"] = principal
        decision: RateDecision | None = None
        if principal is not None and principal.rate_limit is not None:  # keys and Basic users alike
            decision = await to_thread.run_sync(self._limiter().hit, principal.rate_key, principal.rate_limit)
            if not decision.allowed:
                info = ErrorInfo(
                    429,
                    f"You have exceeded {decision.limit} requests per minute.",
                    "RateLimitExceeded",
                    "rate_limit_exceeded",
                    headers={**decision.headers(), "Retry-After": str(decision.retry_after_s)},
                )
                await self._refuse(scope, receive, send, info)
                return
        if decision is None:
            await self.app(scope, receive, send)
            return
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in decision.headers().items()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _capability(self, scope: Scope) -> bool:
        prefix = self.signed_results_prefix
        return (
            prefix is not None
            and scope["method"] in ("GET", "HEAD")
            and scope["path"].startswith(prefix)
            and b"sig=" in scope.get("query_string", b"")
        )

    def _authenticate(self, authorization: str, a1111: bool) -> Principal | None | bool:
        """The caller; None when the server runs open; False when credentials are missing or wrong."""
        keys = self._keys()
        if not self._locked:
            self._locked = keys.any_keys()
        if not self._locked:
            return None  # open server: credentials are not checked (SDKs always send some API key)
        scheme, _, credentials = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and credentials.strip():
            key = keys.authenticate(credentials.strip())
            if key is not None:
                return key_principal(key)
            return False
        if scheme == "basic" and a1111 and self.basic_users:
            user = self._basic_user(credentials.strip())
            if user is None:
                return False
            return basic_principal(user, user in self.basic_admins, self.basic_rate_limit)
        return False

    def _basic_user(self, credentials: str) -> str | None:
        try:
            user, _, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        expected = self.basic_users.get(user)
        if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
            return None
        return user

    def _unauthorized(self, path: str, authorization: str, a1111: bool) -> ErrorInfo:
        given = bool(authorization.strip())
        message = (
            "invalid or revoked API key"
            if given
            else "authentication required: send `Authorization: Bearer <API key>`"
            + (" or HTTP Basic credentials" if a1111 and self.basic_users else "")
        )
        challenge = 'Basic realm="easel"' if a1111 and self.basic_users else "Bearer"
        code = "invalid_api_key" if given else "missing_api_key"
        return ErrorInfo(401, message, "Unauthorized", code, headers={"WWW-Authenticate": challenge})

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, info: ErrorInfo) -> None:
        body = renderer_for(scope["app"], scope["path"])(info)
        await JSONResponse(body, status_code=info.status, headers=info.headers)(scope, receive, send)
