"""A1111 prompt syntax (pure Python): emphasis parsing against A1111's own doctests, BREAK, LoRA tags, plain text."""

from __future__ import annotations

import pytest

from pipelines.prompts import (
    clean_prompts,
    extract_loras,
    is_break,
    merge_loras,
    parse_prompt_attention,
    request_loras,
    strip_attention,
)
from pipelines.request import GenerationRequest, LoraRef

# The examples in the docstring of A1111's modules/prompt_parser.py `parse_prompt_attention` (v1.10), verbatim.
A1111_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCTESTS)
def test_parser_matches_a1111_doctests(text: str, expected: list[tuple[str, float]]) -> None:
    # Exact float equality: the same multiplications in the same order as A1111.
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [("", 1.0)]),
        ("((a))", [("a", 1.1 * 1.1)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("[[a]] b", [("a", 1 / 1.1 / 1.1), (" b", 1.0)]),
        ("(a:0.5) (b:1.5)", [("a", 0.5), (" ", 1.0), ("b", 1.5)]),
        ("(a:1)", [("a", 1.0)]),
        ("(a:-1.5)", [("a", -1.5)]),
        ("(a:+.5)", [("a", 0.5)]),
        ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
        ("x\\\\y", [("x\\y", 1.0)]),  # \\ -> one literal backslash
        ("a\\b", [("ab", 1.0)]),  # a lone backslash disappears, as in A1111
        ("a) b] c", [("a) b] c", 1.0)]),  # unmatched closers are text
        ("a: b", [("a: b", 1.0)]),
        ("(a: b)", [("a: b", 1.1)]),  # ":" not followed by a number is text
        ("a (b:1.2.3) c", [("a ", 1.0), ("b:1.2.3) c", 1.1)]),  # A1111 raises on 1.2.3; we keep it as text
    ],
)
def test_parser_edge_cases(text: str, expected: list[tuple[str, float]]) -> None:
    _assert_parsed(parse_prompt_attention(text), expected)


def _assert_parsed(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a, BREAK\n b", [("a,", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("BREAK b", [("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("aBREAKb break BREAKS", [("aBREAKb break BREAKS", 1.0)]),  # only the whole upper-case word
        ("(a) BREAK (b)", [("a", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1)]),
    ],
)
def test_break_yields_the_a1111_marker(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


def test_break_inside_brackets_still_counts_as_break() -> None:
    parsed = parse_prompt_attention("(a BREAK b)")
    _assert_parsed(parsed, [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)])  # A1111's output
    assert [is_break(p) for p in parsed] == [False, True, False]  # A1111 would encode the word with weight -1.1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a (red:1.3) fox, [blurry], ((masterpiece))", "a red fox, blurry, masterpiece"),
        ("a fox BREAK in the snow", "a fox in the snow"),
        ("\\(literal\\) parens", "(literal) parens"),
        ("plain text", "plain text"),
        ("(a BREAK b)", "a b"),
    ],
)
def test_strip_attention_keeps_the_text(text: str, expected: str) -> None:
    assert strip_attention(text) == expected


def test_extract_loras_forms() -> None:
    prompt = (
        "a cat, <lora:foo bar.v2:0.8> <lyco:lyc> <lora:sep:1:0.5> <hypernet:h:1> "
        "<lora:named:te=0.3:unet=0.7> <lora:dyn:0.6:0.6:8> <lora:bad:abc>"
    )
    clean, loras = extract_loras(prompt)
    assert clean == "a cat,       "  # tags removed, surrounding text untouched (A1111's re.sub)
    assert loras == [
        LoraRef("foo bar.v2", 0.8),
        LoraRef("lyc", 1.0),  # no number: weight 1; `lyco` is an alias of `lora`
        LoraRef("sep", 0.5, te_weight=1.0),  # <lora:name:te:unet>
        LoraRef("named", 0.7, te_weight=0.3),
        LoraRef("dyn", 0.6),  # the dyn dimension is ignored
        LoraRef("bad", 1.0),  # an unreadable number falls back to the default
    ]
    assert extract_loras("no tags <here> or <lora:>") == ("no tags <here> or <lora:>", [])


def test_request_loras_merges_structured_and_prompt_tags() -> None:
    req = GenerationRequest(
        model="m",
        prompt="x <lora:a:0.5> <lora:b:0.25> <lora:a:0.25>",
        negative_prompt="ugly <lora:neg:1>",
        loras=[LoraRef("c", 0.7), LoraRef("a", 0.25)],
    )
    # Structured first, then tags; a repeated name adds up (applying a LoRA twice adds its deltas).
    assert request_loras(req) == (LoraRef("c", 0.7), LoraRef("a", 1.0), LoraRef("b", 0.25))
    assert clean_prompts(req) == ("x   ", "ugly ")  # negative tags are removed but not activated
    assert merge_loras([LoraRef("a", 1.0, 0.0), LoraRef("a", 1.0)]) == (LoraRef("a", 2.0, 1.0),)
    hash(request_loras(req))  # part of the batch key
