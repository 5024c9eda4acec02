"""The A1111 dialect's own state: the current checkpoint and the options dict (A1111's `opts`).

Only this dialect has a "current model"; other dialects name their model per request. There is one server-wide
session (`A1111State`, on `app.state.a1111`, created on first use so it is per app): on an open server it is the
only one, exactly A1111's behaviour. With keys or Basic users, each non-admin caller has its own session
(`OwnSession`, persisted in the `a1111_sessions` table) over the server-wide one: its frontend switching models or
formats touches nobody else. Admins (and everyone on an open server) change the server-wide session, which is
what callers without their own values see.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request
from sqlalchemy.engine import Engine

from pipelines.registry import ModelSpec, Registry
from server.access.db import A1111Session
from server.access.principal import current
from server.api.a1111 import options as opts
from server.errors import ApiError
from server.jobs.db import make_session_factory, utcnow
from server.settings import Settings

log = logging.getLogger("easel.a1111")

# Option names that look like credentials are never stored, so GET /options can never hand one out.
# ("token_merging_ratio" is a real A1111 option, so only a trailing "token"/"auth" counts.)
SECRET_NAME = re.compile(
    r"(password|passwd|secret|credential|api_?key|access_?key|private_?key|(^|_)token$|(^|_)auth$)", re.IGNORECASE
)

# Read-only keys derived from the current checkpoint: POSTing them does nothing.
DERIVED_OPTIONS = ("sd_model_checkpoint", "sd_checkpoint_hash")


def default_options(settings: Settings) -> dict[str, Any]:
    """The A1111 options clients read, with values describing what this server actually does."""
    return opts.defaults(sd_checkpoints_limit=settings.cache_max_models)


def storable(values: dict[str, Any]) -> dict[str, Any]:
    """The options of a (checked) POST that are kept: not the derived keys, nothing that looks like a credential."""
    kept = {}
    for key, value in values.items():
        if key in DERIVED_OPTIONS:
            continue
        if SECRET_NAME.search(key):
            log.warning("POST /options: option '%s' looks like a credential and was not stored", key)
            continue
        kept[key] = opts.normalise(key, value)
    return kept


class Session(Protocol):
    """What the A1111 routes use: the caller's current checkpoint and options, and how to change them."""

    state: A1111State

    @property
    def registry(self) -> Registry: ...

    @property
    def current_model(self) -> ModelSpec: ...

    @property
    def options(self) -> dict[str, Any]: ...

    def options_view(self) -> dict[str, Any]: ...

    def update(self, values: dict[str, Any], model_id: str | None = None, field: str = "options") -> None: ...


def _view(spec: ModelSpec, options: dict[str, Any]) -> dict[str, Any]:
    """GET /options: A1111's whole option set with its defaults, the stored options over them, and the checkpoint
    keys, which always describe the current model."""
    return {**opts.catalog_defaults(), **options, "sd_model_checkpoint": spec.title, "sd_checkpoint_hash": spec.sha256}


@dataclass
class A1111State:
    """The server-wide session, and what A1111 shows of the engine (which job was interrupted or skipped)."""

    registry: Registry
    current_model_id: str
    options: dict[str, Any]
    sessions: SessionStore | None = None
    interrupted_job_id: str | None = None
    skipped_job_id: str | None = None

    @property
    def state(self) -> A1111State:
        return self

    @property
    def current_model(self) -> ModelSpec:
        if self.current_model_id not in self.registry.models:  # its checkpoint file went away
            self.current_model_id = self.registry.default_model
        return self.registry.get(self.current_model_id)

    @property
    def effective_options(self) -> dict[str, Any]:
        return opts.effective(self.options)

    def options_view(self) -> dict[str, Any]:
        return _view(self.current_model, self.effective_options)

    def update(self, values: dict[str, Any], model_id: str | None = None, field: str = "options") -> None:
        """Keep checked `values` (and the checkpoint) as the server-wide options."""
        merged = {**self.options, **storable(values)}
        if errors := opts.check_total(merged, field):
            raise ApiError.invalid(errors)
        self.options = merged
        if model_id is not None:
            self.current_model_id = model_id


class ServerSession:
    """The server-wide session as a caller sees it (open server, admins)."""

    def __init__(self, state: A1111State):
        self.state = state

    @property
    def registry(self) -> Registry:
        return self.state.registry

    @property
    def current_model(self) -> ModelSpec:
        return self.state.current_model

    @property
    def options(self) -> dict[str, Any]:
        return self.state.effective_options

    def options_view(self) -> dict[str, Any]:
        return self.state.options_view()

    def update(self, values: dict[str, Any], model_id: str | None = None, field: str = "options") -> None:
        self.state.update(values, model_id, field)


class SessionStore:
    """Per-caller sessions in the job database, so they survive restarts and every ingress replica sees them."""

    def __init__(self, engine: Engine):
        self._session = make_session_factory(engine)

    def load(self, owner: str) -> tuple[str | None, dict[str, Any]]:
        with self._session() as session:
            row = session.get(A1111Session, owner)
            if row is None:
                return None, {}
            return row.checkpoint, _decode(row.options)

    def update(self, owner: str, values: dict[str, Any], model_id: str | None, field: str) -> None:
        """Merge `values` into the owner's stored options in one transaction (bounded in total)."""
        with self._session.begin() as session:
            row = session.get(A1111Session, owner)
            if row is None:
                row = A1111Session(owner=owner, checkpoint=None, options="{}", updated_at=utcnow())
                session.add(row)
            merged = {**_decode(row.options), **values}
            if errors := opts.check_total(merged, field):
                raise ApiError.invalid(errors)
            row.options = json.dumps(merged, ensure_ascii=False)
            if model_id is not None:
                row.checkpoint = model_id
            row.updated_at = utcnow()


def _decode(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class OwnSession:
    """A caller's own session over the server-wide one: its own values win, the rest are the server's."""

    def __init__(self, state: A1111State, store: SessionStore, owner: str):
        self.state = state
        self._store = store
        self.owner = owner
        self._checkpoint, self._options = store.load(owner)

    @property
    def registry(self) -> Registry:
        return self.state.registry

    @property
    def current_model(self) -> ModelSpec:
        spec = self.registry.models.get(self._checkpoint) if self._checkpoint else None
        return spec if spec is not None else self.state.current_model  # gone since: the server's

    @property
    def options(self) -> dict[str, Any]:
        return opts.effective({**self.state.options, **self._options})

    def options_view(self) -> dict[str, Any]:
        return _view(self.current_model, self.options)

    def update(self, values: dict[str, Any], model_id: str | None = None, field: str = "options") -> None:
        kept = storable(values)
        self._store.update(self.owner, kept, model_id, field)
        self._options.update(kept)
        if model_id is not None:
            self._checkpoint = model_id


def create_state(registry: Registry, settings: Settings, engine: Engine | None = None) -> A1111State:
    return A1111State(
        registry=registry,
        current_model_id=registry.default_model,
        options=default_options(settings),
        sessions=SessionStore(engine) if engine is not None else None,
    )


def get_state(request: Request) -> A1111State:
    """The server-wide A1111 state of this app, created on first use."""
    app_state = request.app.state
    state = getattr(app_state, "a1111", None)
    if state is None:
        jobs = getattr(app_state, "jobs", None)
        state = create_state(app_state.registry, app_state.settings, jobs.store.engine if jobs else None)
        app_state.a1111 = state
    return state


def get_session(request: Request) -> Session:
    """FastAPI dependency: the caller's A1111 session. Open server and admins: the server-wide one; any other
    caller (API key, Basic user): its own."""
    state = get_state(request)
    principal = current(request)
    if principal is None or principal.admin or state.sessions is None:
        return ServerSession(state)
    return OwnSession(state, state.sessions, principal.id)


def require_admin(request: Request, action: str) -> None:
    """403 in A1111's shape for a server-wide action by a caller who is not an admin."""
    principal = current(request)
    if principal is not None and not principal.admin:
        raise ApiError(
            403,
            f"{action} acts on the whole server: it needs an admin key (easel keys create --admin) or an admin "
            "Basic user (EASEL_API_AUTH_ADMINS)",
            code="forbidden",
        )
