"""Model names as aggregator clients send them: `provider/name` (IndoxHub's `openai/dall-e-3`, `google/...`).

There is no upstream provider here, so the prefix only says which vendor's name follows. The full string is tried
first (a models.yaml id or alias may itself contain a slash), then the name after the first slash.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.registry import ModelSpec, Registry


@dataclass(frozen=True)
class ResolvedName:
    spec: ModelSpec | None
    name: str  # the name that resolved (without the provider prefix), or the full name when nothing did
    provider: str | None  # the prefix of `provider/name`, when that is what resolved


def resolve_name(registry: Registry, name: str) -> ResolvedName:
    name = name.strip()
    spec = registry.resolve(name)
    if spec is not None or "/" not in name:
        return ResolvedName(spec, name, None)
    provider, rest = name.split("/", 1)
    spec = registry.resolve(rest)
    return ResolvedName(spec, rest, provider) if spec is not None else ResolvedName(None, name, None)


def bare_name(name: str | None) -> str | None:
    """The name without a `provider/` prefix (for name-based defaults such as dall-e's url responses)."""
    return name.strip().rsplit("/", 1)[-1] if name else name
