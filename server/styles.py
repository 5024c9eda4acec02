"""Style presets from styles.yaml: a prompt template and a negative prompt per style, shared by every dialect that
has a `style` (GenPicz, Genrex) or `styles` (A1111 prompt-styles)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PLACEHOLDER = "{prompt}"


class StyleError(ValueError):
    """styles.yaml could not be read or is invalid; the message names the file and the field."""


class Style(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    name: str
    description: str = ""
    prompt: str = PLACEHOLDER
    negative_prompt: str = ""

    def apply(self, prompt: str, negative_prompt: str = "") -> tuple[str, str]:
        """(prompt, negative prompt) with this style applied. A1111's rule: the template's `{prompt}` is replaced by
        the prompt, or the template is appended after a comma; the negative prompts are joined the same way."""
        return _merge(self.prompt, prompt), _merge(self.negative_prompt, negative_prompt)


def _merge(template: str, text: str) -> str:
    if PLACEHOLDER in template:
        return template.replace(PLACEHOLDER, text)
    if not template:
        return text
    if not text:
        return template
    return f"{text}, {template}"


class _StylesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    styles: dict[str, dict] = Field(default_factory=dict)


class StyleBook:
    """The presets by id, in file order."""

    def __init__(self, styles: list[Style]):
        self.styles = {s.id: s for s in styles}

    def __contains__(self, style_id: object) -> bool:
        return style_id in self.styles

    def __iter__(self):
        return iter(self.styles.values())

    def get(self, style_id: str) -> Style | None:
        return self.styles.get(style_id)

    def by_name(self, name: str) -> Style | None:
        """A1111 sends style names; ids are accepted too."""
        for style in self.styles.values():
            if name in (style.name, style.id):
                return style
        return None

    def ids(self) -> list[str]:
        return list(self.styles)


def load_styles(path: str | Path) -> StyleBook:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        parsed = _StylesFile.model_validate(raw)
        styles = [Style(id=style_id, **fields) for style_id, fields in parsed.styles.items()]
    except OSError as e:
        raise StyleError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise StyleError(f"{path}: invalid YAML: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise StyleError(f"{path}: field '{where}': {first['msg']}") from None
    return StyleBook(styles)


@lru_cache(maxsize=8)
def cached_styles(path: str) -> StyleBook:
    return load_styles(path)
