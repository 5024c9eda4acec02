"""A1111 prompt editing `[from:to:when]` and alternation `[a|b]`: the prompt text of every sampling step.

Reproduces A1111 v1.10 `modules/prompt_parser.get_learned_conditioning_prompt_schedules` (its lark grammar, written
out by hand here) and `reconstruct_cond_batch`:

- `[from:to:when]` is `from` up to step `when`, then `to`; `[to:when]` adds `to` after `when`; `[from::when]` removes
  `from` after it. `when` with a decimal point is a fraction of the steps (`int(when * steps)`), without one a step
  number; capped at `steps`.
- `[a|b|c]` alternates every step (step 1 `a`, step 2 `b`, ...).
- Round and square emphasis brackets are kept as text (the emphasis parser reads them afterwards); a bracket that
  fits none of the forms is literal text, as A1111's parse of a prompt it cannot read leaves the prompt as written.

`prompt_schedule(text, steps)` gives A1111's [(end_at_step, text), ...]; sampling step k (0-based, as A1111's
denoiser counts) uses the first entry whose end_at_step >= k (A1111's off-by-one included, so `[a:b:10]` of 20
steps runs `a` for steps 0..10).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*")
_SPECIAL = set("\\[]():|")


@dataclass
class _Scheduled:
    before: list | None
    after: list
    number: str
    when: int = 0


@dataclass
class _Alternate:
    options: list[list]


Node = str | _Scheduled | _Alternate | list


def _parse_seq(s: str, i: int, top: bool) -> tuple[list, int]:
    """A1111's `prompt` rule from s[i]: text, whitespace and bracket groups, up to a character that ends it (`:`,
    `|`, `)`, `]`; at the top level those are literal text too)."""
    out: list = []
    while i < len(s):
        c = s[i]
        if c == "\\":
            out.append(s[i : i + 2])
            i += 2
        elif c == "(":
            node, j = _parse_round(s, i)
            if node is None:
                if not top:
                    return out, i
                out.append(c)
                i += 1
            else:
                out.append(node)
                i = j
        elif c == "[":
            node, j = _parse_square(s, i)
            if node is None:
                if not top:
                    return out, i
                out.append(c)
                i += 1
            else:
                out.append(node)
                i = j
        elif c in ":|)]":
            if not top:
                return out, i
            out.append(c)
            i += 1
        else:
            j = i
            while j < len(s) and s[j] not in _SPECIAL:
                j += 1
            out.append(s[i:j])
            i = j
    return out, i


def _parse_round(s: str, i: int) -> tuple[Node | None, int]:
    """`(prompt)` or `(prompt:prompt)`, kept as text with its brackets."""
    first, j = _parse_seq(s, i + 1, False)
    if j < len(s) and s[j] == ")":
        return ["(", first, ")"], j + 1
    if j < len(s) and s[j] == ":":
        second, k = _parse_seq(s, j + 1, False)
        if k < len(s) and s[k] == ")":
            return ["(", first, ":", second, ")"], k + 1
    return None, i


def _parse_square(s: str, i: int) -> tuple[Node | None, int]:
    """`[prompt]` (kept as text), `[a|b|...]`, `[to:when]` or `[from:to:when]`."""
    first, j = _parse_seq(s, i + 1, False)
    if j >= len(s):
        return None, i
    if s[j] == "]":
        return ["[", first, "]"], j + 1
    if s[j] == "|":
        options = [first]
        while j < len(s) and s[j] == "|":
            option, j = _parse_seq(s, j + 1, False)
            options.append(option)
        if j < len(s) and s[j] == "]":
            return _Alternate(options), j + 1
        return None, i
    if s[j] != ":":
        return None, i
    m = _NUMBER.match(s, j + 1)
    if m and m.end() < len(s) and s[m.end()] == "]":  # [to:when]
        return _Scheduled(None, first, m.group(1)), m.end() + 1
    second, k = _parse_seq(s, j + 1, False)
    if k < len(s) and s[k] == ":":
        m = _NUMBER.match(s, k + 1)
        if m and m.end() < len(s) and s[m.end()] == "]":  # [from:to:when]
            return _Scheduled(first, second, m.group(1)), m.end() + 1
    return None, i


def _walk(node: Node):
    if isinstance(node, list):
        for child in node:
            yield from _walk(child)
    elif isinstance(node, _Scheduled):
        yield node
        if node.before is not None:
            yield from _walk(node.before)
        yield from _walk(node.after)
    elif isinstance(node, _Alternate):
        yield node
        for option in node.options:
            yield from _walk(option)


def _text_at(node: Node, step: int) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return "".join(_text_at(child, step) for child in node)
    if isinstance(node, _Scheduled):
        chosen = (node.before or []) if step <= node.when else node.after
        return _text_at(chosen, step)
    return _text_at(node.options[(step - 1) % len(node.options)], step)


def prompt_schedule(text: str, steps: int, base_steps: int | None = None) -> list[tuple[int, str]]:
    """A1111's schedule of one prompt: [(end_at_step, text)], sorted; one entry for a prompt without editing.
    `base_steps`: this is a hires second pass of `steps` after a first pass of `base_steps` (A1111's `hires_steps`
    offsets: step numbers count on from the first pass, fractions from 1.0)."""
    int_offset, flt_offset = (0, 0.0) if base_steps is None else (base_steps, 1.0)
    tree, _ = _parse_seq(text, 0, True)
    ends = {steps}
    for node in _walk(tree):
        if isinstance(node, _Scheduled):
            v = float(node.number)
            node.when = min(steps, int((v - flt_offset) * steps if "." in node.number else v - int_offset))
            if node.when >= 1:
                ends.add(node.when)
        else:
            ends.update(range(1, steps + 1))
    return [(end, _text_at(tree, end)) for end in sorted(ends)]


def text_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """A1111 `reconstruct_cond_batch`: the text for 0-based sampling step `step`."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[0][1]  # A1111 falls back to the first entry


def schedules(texts: list[str], steps: int, base_steps: int | None = None) -> list[list[tuple[int, str]]] | None:
    """Each text's schedule, or None when no text changes across steps (the common case: one encoding per call)."""
    if not any("[" in t for t in texts):
        return None
    out = [prompt_schedule(t, steps, base_steps) for t in texts]
    return out if any(len(s) > 1 for s in out) else None
