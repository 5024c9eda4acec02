"""A1111-style text embeddings on the demo SD1.5/SDXL pipelines: weights, 75-token chunks, BREAK, SDXL pooled."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a test that reaches for the network is a bug


import numpy as np
import pytest
import torch

from pipelines.families import adapter_for
from pipelines.prompt_embeds import (
    CHUNK_LENGTH,
    CacheScope,
    apply_emphasis,
    encode_sd15,
    encode_sdxl,
    tokenize_chunks,
)
from pipelines.request import GenerationRequest, LoraRef
from pipelines.text_cache import TextEmbeddingCache

LONG_WORDS = 100  # "a " * 100: 100 tokens with the demo's byte tokenizer, past one 75-token chunk


@pytest.fixture(scope="module")
def sd15(load):
    return load("sd15").base


@pytest.fixture(scope="module")
def sdxl(load):
    return load("sdxl").base


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- chunking ---------------------------------------------------------------------------------------------------------


def test_short_prompt_is_one_77_token_chunk(sd15) -> None:
    tok = sd15.tokenizer
    (chunk,) = tokenize_chunks(tok, "a fox")
    ids = _ids(tok, "a fox")
    assert chunk.ids == [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * (CHUNK_LENGTH - len(ids))
    assert len(chunk.ids) == len(chunk.weights) == 77 and set(chunk.weights) == {1.0}


def test_weights_follow_the_fragments(sd15) -> None:
    tok = sd15.tokenizer
    (chunk,) = tokenize_chunks(tok, "a (fox:1.3) [in]")
    n_a, n_fox, n_space, n_in = (len(_ids(tok, t)) for t in ("a ", "fox", " ", "in"))
    expected = [1.0] + [1.0] * n_a + [1.3] * n_fox + [1.0] * n_space + [1 / 1.1] * n_in + [1.0]  # BOS ... EOS
    assert chunk.weights[: len(expected)] == pytest.approx(expected)


def test_long_prompt_makes_two_chunks(sd15) -> None:
    tok = sd15.tokenizer
    chunks = tokenize_chunks(tok, "a " * LONG_WORDS)
    assert len(chunks) == 2
    assert [len(c.ids) for c in chunks] == [77, 77]
    assert chunks[0].ids[0] == chunks[1].ids[0] == tok.bos_token_id
    assert chunks[0].ids[76] == tok.eos_token_id  # a full chunk: BOS + 75 + EOS
    assert chunks[1].ids[1 : 1 + LONG_WORDS - CHUNK_LENGTH] == _ids(tok, "a " * LONG_WORDS)[CHUNK_LENGTH:]


def test_break_starts_a_new_chunk(sd15) -> None:
    tok = sd15.tokenizer
    first, second = tokenize_chunks(tok, "a fox BREAK snow")
    assert first.ids == tokenize_chunks(tok, "a fox")[0].ids
    assert second.ids == tokenize_chunks(tok, "snow")[0].ids
    assert len(tokenize_chunks(tok, "a fox BREAK")) == 1  # nothing after it: no empty chunk


def test_comma_backtrack_keeps_the_words_after_the_last_comma_together(sd15) -> None:
    tok = sd15.tokenizer
    prompt = "a " * 70 + ", " + "b " * 10  # the chunk fills up 5 tokens after the comma
    first, second = tokenize_chunks(tok, prompt)
    comma = tok.convert_tokens_to_ids(",</w>")
    assert first.ids[71] == comma and first.ids[72] == tok.eos_token_id  # cut right after the comma
    assert second.ids[1:11] == _ids(tok, "b " * 10)
    far = "a " * 50 + ", " + "b " * 30  # the comma is 25 tokens back: more than 20, a plain cut at 75
    assert tokenize_chunks(tok, far)[0].ids[76] == tok.eos_token_id
    assert _ids(tok, "b")[0] in tokenize_chunks(tok, far)[0].ids
    assert len(tokenize_chunks(tok, prompt, comma_backtrack=0)[0].ids) == 77


# --- emphasis ---------------------------------------------------------------------------------------------------------


def test_emphasis_scales_weighted_tokens_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    z = torch.randn(2, 77, 8) + 0.5
    w = torch.ones(2, 77)
    w[0, 5:8] = 1.3
    out = apply_emphasis(z, w)
    assert torch.equal(out[1], z[1])  # an unweighted row is untouched
    assert out[0].mean() == pytest.approx(z[0].mean().item(), rel=1e-5)  # "Original": the mean is restored
    ratio = out[0] / z[0]
    assert torch.allclose(ratio[5:8], 1.3 * ratio[0], rtol=1e-4)


# --- SD1.5 ------------------------------------------------------------------------------------------------------------


def test_plain_prompt_matches_diffusers(sd15) -> None:
    prompts, negatives = ["a red fox, snow", "b"], ["ugly", ""]
    ours = encode_sd15(sd15, prompts, negatives)
    with torch.no_grad():
        pos, neg = sd15.encode_prompt(prompts, "cpu", 1, True, negatives)
    assert torch.equal(ours["prompt_embeds"], pos) and torch.equal(ours["negative_prompt_embeds"], neg)


def test_weight_one_equals_plain_and_weights_move_the_embedding(sd15) -> None:
    plain = encode_sd15(sd15, ["a fox in"], [""])["prompt_embeds"]
    assert torch.equal(encode_sd15(sd15, ["a (fox:1) in"], [""])["prompt_embeds"], plain)
    up = encode_sd15(sd15, ["a (fox:1.3) in"], [""])["prompt_embeds"]
    down = encode_sd15(sd15, ["a [fox] in"], [""])["prompt_embeds"]
    fox = slice(2, 5)  # BOS, "a", then the three byte tokens of "fox"
    other = [0, 1, 5, 6]
    for z, w in ((up, 1.3), (down, 1 / 1.1)):
        ratio = z[0] / plain[0]  # = weight * (old mean / new mean) everywhere
        c = ratio[other].mean()
        assert torch.allclose(ratio[other], c.expand_as(ratio[other]), rtol=1e-4)
        assert torch.allclose(ratio[fox], (w * c).expand_as(ratio[fox]), rtol=1e-4)


def test_long_prompt_is_two_chunks_and_the_first_is_the_truncated_prompt(sd15) -> None:
    long = "a " * LONG_WORDS
    truncated = "a " * CHUNK_LENGTH
    out = encode_sd15(sd15, [long], ["ugly"])
    assert out["prompt_embeds"].shape == (1, 154, 32)
    assert out["negative_prompt_embeds"].shape == (1, 154, 32)  # padded to the positive's chunk count
    short = encode_sd15(sd15, [truncated], ["ugly"])
    assert torch.allclose(out["prompt_embeds"][:, :77], short["prompt_embeds"], atol=1e-6)
    assert torch.allclose(out["negative_prompt_embeds"][:, :77], short["negative_prompt_embeds"], atol=1e-6)
    # The negative's padding is the encoding of an empty chunk.
    empty = encode_sd15(sd15, [""], [""])["prompt_embeds"]
    assert torch.allclose(out["negative_prompt_embeds"][:, 77:], empty, atol=1e-6)


def test_break_chunk_is_encoded_on_its_own(sd15) -> None:
    z = encode_sd15(sd15, ["a fox BREAK snow"], [""])["prompt_embeds"]
    assert z.shape == (1, 154, 32)
    assert torch.allclose(z[:, :77], encode_sd15(sd15, ["a fox"], [""])["prompt_embeds"], atol=1e-6)
    assert torch.allclose(z[:, 77:], encode_sd15(sd15, ["snow"], [""])["prompt_embeds"], atol=1e-6)


def test_batch_rows_match_solo_encodings(sd15) -> None:
    both = encode_sd15(sd15, ["(a:1.5) b", "c", "(a:1.5) b"], ["", "x", ""])
    solo = encode_sd15(sd15, ["(a:1.5) b"], [""])
    assert torch.allclose(both["prompt_embeds"][0], solo["prompt_embeds"][0], atol=1e-6)
    assert torch.equal(both["prompt_embeds"][0], both["prompt_embeds"][2])


def test_clip_skip_matches_diffusers(sd15) -> None:
    ours = encode_sd15(sd15, ["a fox"], [""], clip_skip=2)["prompt_embeds"]
    encoder = sd15.text_encoder
    ids = sd15.tokenizer(["a fox"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():  # A1111 "Clip skip 2": the penultimate layer through the final layer norm
        ref = getattr(encoder, "text_model", encoder).final_layer_norm(
            encoder(ids, output_hidden_states=True).hidden_states[-2]
        )
    assert torch.allclose(ours, ref, atol=1e-6)
    assert not torch.allclose(ours, encode_sd15(sd15, ["a fox"], [""])["prompt_embeds"])


def test_long_prompt_changes_the_image_vs_truncation(load) -> None:
    loaded = load("sd15")

    def image(prompt: str) -> np.ndarray:
        req = GenerationRequest(model="demo-sd15", prompt=prompt, width=64, height=64, steps=2, guidance=7.0)
        (im,) = adapter_for("sd15").run(loaded, req, [3], None, lambda i, n: False)
        return np.asarray(im, dtype=np.int16)

    truncated = image("a " * CHUNK_LENGTH)  # what a 77-token encoder would see
    assert np.abs(image("a " * CHUNK_LENGTH + "b " * 30) - truncated).max() > 0
    assert np.array_equal(image("a " * CHUNK_LENGTH + "BREAK"), truncated)  # a trailing BREAK adds no chunk


# --- SDXL -------------------------------------------------------------------------------------------------------------


def test_sdxl_plain_prompt_matches_diffusers(sdxl) -> None:
    prompts, negatives = ["a red fox, snow", "b"], ["ugly", ""]
    ours = encode_sdxl(sdxl, prompts, negatives)
    with torch.no_grad():
        ref = sdxl.encode_prompt(prompts, None, "cpu", 1, True, negatives)
    keys = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for key, expected in zip(keys, ref, strict=True):
        assert torch.allclose(ours[key], expected, atol=1e-5), key
    assert ours["pooled_prompt_embeds"].shape == (2, 32)
    assert ours["prompt_embeds"].shape == (2, 77, 64)  # both encoders' hidden states side by side


def test_sdxl_empty_negatives_are_zeros(sdxl) -> None:
    out = encode_sdxl(sdxl, ["a fox"], [""])
    assert not out["negative_prompt_embeds"].any() and not out["negative_pooled_prompt_embeds"].any()
    out = encode_sdxl(sdxl, ["a fox", "b"], ["", "ugly"])  # mixed: "" is encoded like any text
    assert out["negative_prompt_embeds"][0].any()


def test_sdxl_long_prompt_pooled_comes_from_the_first_chunk(sdxl) -> None:
    long = encode_sdxl(sdxl, ["a " * LONG_WORDS], ["ugly"])
    first = encode_sdxl(sdxl, ["a " * CHUNK_LENGTH], ["ugly"])
    assert long["prompt_embeds"].shape == (1, 154, 64)
    assert long["negative_prompt_embeds"].shape == (1, 154, 64)
    assert long["pooled_prompt_embeds"].shape == (1, 32)
    assert torch.allclose(long["pooled_prompt_embeds"], first["pooled_prompt_embeds"], atol=1e-6)
    assert torch.allclose(long["prompt_embeds"][:, :77], first["prompt_embeds"], atol=1e-6)


# --- the text-embedding cache ----------------------------------------------------------------------------------------


def test_cached_chunks_skip_the_encoder_and_give_the_same_embeddings(sd15, sdxl) -> None:
    for pipe, encode in ((sd15, encode_sd15), (sdxl, encode_sdxl)):
        cache = TextEmbeddingCache()
        scope = CacheScope(cache)
        prompts, negatives = ["a red fox", "(snow:1.3) BREAK hills"], ["ugly", "ugly"]
        first = encode(pipe, prompts, negatives, cache=scope)
        misses = cache.misses
        assert cache.hits == 0 and len(cache) > 0
        again = encode(pipe, prompts, negatives, cache=scope)
        assert cache.misses == misses and cache.hits > 0  # nothing went through the encoders
        uncached = encode(pipe, prompts, negatives)
        for key, value in first.items():
            assert torch.equal(value, again[key]), key
            assert torch.allclose(value, uncached[key], atol=1e-6), key
        # A batch mixing a cached prompt with a new one encodes only the new one, padded to the same chunk count.
        misses = cache.misses
        mixed = encode(pipe, ["a red fox", "c"], ["ugly", "ugly"], cache=scope)
        assert cache.misses == misses + (1 if pipe is sd15 else 2)  # only the chunk of "c", once per encoder
        plain = encode(pipe, ["a red fox", "c"], ["ugly", "ugly"])
        for key, value in mixed.items():
            assert torch.allclose(value, plain[key], atol=1e-6), key


def test_cache_entries_are_kept_apart_by_scope_and_layer(sd15) -> None:
    cache = TextEmbeddingCache()
    encode_sd15(sd15, ["a fox"], [""], cache=CacheScope(cache, ()))
    n = len(cache)
    lora = (LoraRef("style", 0.8),)
    encode_sd15(sd15, ["a fox"], [""], cache=CacheScope(cache, lora))  # a LoRA changes the text encoder: no reuse
    assert len(cache) == 2 * n and cache.hits == 0
    skipped = encode_sd15(sd15, ["a fox"], [""], clip_skip=2, cache=CacheScope(cache, ()))
    assert len(cache) == 3 * n and cache.hits == 0
    assert not torch.allclose(skipped["prompt_embeds"], encode_sd15(sd15, ["a fox"], [""])["prompt_embeds"])


def test_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used() -> None:
    row = (torch.zeros(256), None)  # 1 KiB
    cache = TextEmbeddingCache(max_bytes=3 * 1024)
    for key in "abc":
        cache.put(key, row)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", row)
    assert len(cache) == 3 and cache.bytes == 3 * 1024
    assert cache.get("b") is None and cache.get("a") is not None
    cache.put("huge", (torch.zeros(2048), None))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and len(cache) == 3


def test_the_sd_adapter_reuses_the_models_cache(load) -> None:
    loaded = load("sd15")
    loaded.text_cache.clear()
    req = GenerationRequest(model="demo-sd15", prompt="a cached fox", width=64, height=64, steps=1, guidance=7.0)
    first = adapter_for("sd15").run(loaded, req, [5], None, lambda i, n: False)
    hits = loaded.text_cache.hits
    second = adapter_for("sd15").run(loaded, req, [5], None, lambda i, n: False)
    assert loaded.text_cache.hits > hits
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))


def test_the_sd15_adapter_applies_clip_skip(load) -> None:
    loaded = load("sd15")

    def image(clip_skip: int) -> np.ndarray:
        req = GenerationRequest(model="demo-sd15", prompt="a fox", width=64, height=64, steps=2, clip_skip=clip_skip)
        (im,) = adapter_for("sd15").run(loaded, req, [3], None, lambda i, n: False)
        return np.asarray(im, dtype=np.int16)

    assert np.abs(image(2) - image(1)).max() > 0
    assert np.array_equal(image(2), image(2))
