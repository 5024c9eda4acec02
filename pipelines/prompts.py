"""A1111 prompt syntax, pure Python: emphasis weights, BREAK, and `<lora:...>` tags.

- `parse_prompt_attention` reproduces A1111's `modules/prompt_parser.parse_prompt_attention` (v1.10), including its
  documented examples: `(word)` x1.1 per level, `(word:1.3)`, `[word]` /1.1, `\\(` `\\)` `\\[` `\\]` `\\\\` literals,
  unbalanced brackets closing at the end, BREAK as `("BREAK", -1)`, runs of equal weight merged.
- `extract_loras` removes every `<name:args>` extra-network tag from a prompt, as A1111's `extra_networks.parse_prompt`
  does, and returns the `lora` / `lyco` ones as `LoraRef`s.
- `strip_attention` turns A1111 syntax into plain text for text encoders that are not CLIP (FLUX's T5, Qwen's VL
  model): the text is kept, weights and brackets and BREAK go.
- `split_and` splits a prompt into A1111's composable subprompts (`a AND b:0.5`), each with its weight
  (`get_multicond_prompt_list`); SD1.5/SDXL combine them in the denoiser (`pipelines.composable`).

Prompt editing `[a:b:when]` and alternation `[a|b]` are scheduled by `pipelines.prompt_schedules` before this
parser sees each step's text; textual-inversion embeddings are found by `pipelines.prompt_embeds`. Not supported (the
text goes to the encoder as written): `#` comment lines.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import NamedTuple

from pipelines.request import GenerationRequest, LoraRef

log = logging.getLogger("easel.prompts")

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)  # what parse_prompt_attention yields for a BREAK keyword (A1111's marker)

# The same alternatives, in the same order, as A1111's `re_attention`: escapes, a lone backslash, openers,
# ":weight)" closers, plain closers, runs of ordinary text, a lone colon.
_RE_ATTENTION = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\
    | \( | \[
    | :([+-]?[.\d]+)\)
    | \) | \]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
# A1111's `re_extra_net`: `<lora:name:1.0>`, `<hypernet:name>`, ... Every such tag is removed from the prompt.
_RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = frozenset({"lora", "lyco"})  # A1111 registers `lyco` as an alias of the Lora extra network
# A1111's `re_AND` and `re_weight` (prompt_parser.py, v1.10), as written there.
_RE_AND = re.compile(r"\bAND\b")
_RE_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pairs exactly as A1111 does; BREAK yields ("BREAK", -1).

    >>> parse_prompt_attention('an (important) word')
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    res: list[list] = []  # [fragment, weight], mutated while brackets close
    round_open: list[int] = []  # index in res where each open "(" started
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for item in res[start:]:
            item[1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open and _is_float(weight):
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            # Plain text (also an unmatched closer, or ":1.2.3)" whose number A1111 would fail to parse).
            for i, part in enumerate(_RE_BREAK.split(token)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])

    # Brackets still open at the end close there (A1111: "(unbalanced" -> weight 1.1).
    for start in round_open:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)

    if not res:
        res = [["", 1.0]]
    merged: list[list] = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def is_break(fragment: tuple[str, float]) -> bool:
    """A BREAK marker. Inside brackets A1111's marker gets multiplied too ("(a BREAK b)" -> ("BREAK", -1.1)) and A1111
    then encodes the word BREAK with a negative weight; any negative weight counts as the marker here."""
    return fragment[0] == BREAK[0] and fragment[1] < 0


def strip_attention(text: str) -> str:
    """Plain text for non-CLIP encoders (FLUX, Qwen): brackets, weights and escapes resolved, BREAK -> a space."""
    out = "".join(" " if is_break(frag) else frag[0] for frag in parse_prompt_attention(text))
    return out.strip()


class SubPrompt(NamedTuple):
    """One part of an A1111 composable prompt: its text and its weight in the guidance."""

    text: str
    weight: float = 1.0


def split_and(prompt: str) -> list[SubPrompt]:
    """A1111 `get_multicond_prompt_list` for one prompt: split on the word `AND` (uppercase only); a part ending in
    `:number` has that weight (default 1), the number and the whitespace around it are removed, leading whitespace
    is kept. Extra-network tags are removed first (A1111 parses them out of the whole prompt before this).

    >>> split_and("a cat AND a dog:0.5")
    [SubPrompt(text='a cat', weight=1.0), SubPrompt(text=' a dog', weight=0.5)]
    """
    out = []
    for part in _RE_AND.split(prompt):
        m = _RE_WEIGHT.search(part)  # always matches (everything is optional), as in A1111
        text, weight = m.groups() if m is not None else (part, None)
        out.append(SubPrompt(text, float(weight) if weight is not None else 1.0))
    return out


def is_composable(prompt: str) -> bool:
    """Whether A1111 would combine this prompt's guidance differently from one plain prompt: several `AND` parts, or
    one part with a weight other than 1 (A1111 scales the guidance by it: `a cat:2` is twice the CFG term). `prompt`
    is without extra-network tags."""
    parts = split_and(prompt)
    return len(parts) > 1 or parts[0].weight != 1.0


def _number(value: str, default: float, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        log.warning("ignoring the bad number %r in %s", value, tag)
        return default


def extract_loras(prompt: str) -> tuple[str, list[LoraRef]]:
    """Remove every `<kind:args>` tag; return the cleaned prompt and the LoRAs of the `lora`/`lyco` tags, in order.

    Arguments follow A1111's Lora extension: `<lora:name>` (weight 1), `<lora:name:w>` (text encoder and UNet),
    `<lora:name:te:unet>` (separate multipliers), named `te=`/`unet=`; a `dyn` dimension is ignored. Other tags
    (`<hypernet:...>`, unknown kinds) are removed and ignored, as A1111 does for networks it does not know.
    """
    loras: list[LoraRef] = []

    def found(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2)
        if kind not in _LORA_KINDS:
            log.info("ignoring unsupported extra network tag <%s:...>", kind)
            return ""
        positional: list[str] = []
        named: dict[str, str] = {}
        for item in args.split(":"):
            key, eq, value = item.partition("=")
            if eq:
                named[key] = value
            else:
                positional.append(item)
        if not positional or not positional[0]:
            return ""
        tag = m.group(0)
        te = _number(positional[1], 1.0, tag) if len(positional) > 1 else 1.0
        te = _number(named["te"], te, tag) if "te" in named else te
        unet = _number(positional[2], te, tag) if len(positional) > 2 else te
        unet = _number(named["unet"], unet, tag) if "unet" in named else unet
        loras.append(LoraRef(positional[0], unet, None if te == unet else te))
        return ""

    return _RE_EXTRA_NET.sub(found, prompt), loras


def merge_loras(refs: Iterable[LoraRef]) -> tuple[LoraRef, ...]:
    """One entry per name, in order of first mention. A name given twice adds up its weights, which is what A1111's
    applying the same LoRA twice amounts to (the weight deltas add)."""
    merged: dict[str, LoraRef] = {}
    for ref in refs:
        old = merged.get(ref.name)
        if old is None:
            merged[ref.name] = ref
            continue
        weight = old.weight + ref.weight
        te = _te(old) + _te(ref)
        merged[ref.name] = LoraRef(ref.name, weight, None if te == weight else te)
    return tuple(merged.values())


def _te(ref: LoraRef) -> float:
    return ref.weight if ref.te_weight is None else ref.te_weight


def request_loras(req: GenerationRequest) -> tuple[LoraRef, ...]:
    """Every LoRA a request asks for: its structured `loras`, then the `<lora:...>` tags of its prompt.

    Tags in the negative prompt are removed from its text but not activated (A1111 reads LoRA tags from the prompt
    only). Hashable, so the batcher can key on it.
    """
    return merge_loras([*req.loras, *extract_loras(req.prompt)[1]])


def clean_prompts(req: GenerationRequest) -> tuple[str, str]:
    """Prompt and negative prompt with every extra-network tag removed (A1111 syntax otherwise kept)."""
    return extract_loras(req.prompt)[0], extract_loras(req.negative_prompt)[0]
