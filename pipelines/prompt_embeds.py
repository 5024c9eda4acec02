"""A1111-style text conditioning for SD1.5 and SDXL: emphasis weights, 75-token chunks, BREAK.

What A1111 does (`modules/sd_hijack_clip.py`, `modules/sd_emphasis.py`), and so what this does:

- the prompt is split by `prompts.parse_prompt_attention`; each fragment is tokenized without BOS/EOS;
- tokens fill chunks of 75; a BREAK starts a new chunk; when a chunk is full and a comma came within the last 20
  tokens, the tokens after that comma move to the next chunk (A1111's `comma_padding_backtrack`, default 20);
- each chunk becomes 77 ids (BOS + 75 + EOS, padded with the tokenizer's pad token after the first EOS) and is
  encoded on its own; the hidden states are multiplied by the per-token weights and rescaled to the original mean
  ("Original" emphasis); the chunks are concatenated along the sequence axis (77 * n tokens);
- prompts of a batch, and a prompt and its negative, are padded to the same number of chunks with the encoding of an
  empty chunk (A1111 pads a batch the same way; for cond vs uncond it is its `pad_cond_uncond` option);
- SD1.5 uses the last layer (`clip_skip` > 1: an earlier layer through the final layer norm, A1111's "Clip skip");
  SDXL uses the penultimate hidden states of both encoders, concatenated, and the pooled embedding of the second
  encoder's first chunk.

Deviation: the emphasis mean is taken per prompt and chunk, where A1111 takes it over the whole batch of the chunk.
They agree for one prompt; per prompt keeps an image independent of what it was batched with.
A prompt without weights, BREAK or more than 75 tokens gives exactly diffusers' own embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline

from pipelines.embeddings import Embedding, TextualInversions, TokenTable, fixes_applied
from pipelines.prompts import is_break, parse_prompt_attention
from pipelines.text_cache import TextEmbeddingCache

CHUNK_LENGTH = 75  # prompt tokens per chunk; + BOS + EOS = the encoders' 77 positions
COMMA_BACKTRACK = 20  # A1111 `comma_padding_backtrack` default


@dataclass(frozen=True)
class CacheScope:
    """A text-embedding cache and what else the encoders' output depends on in this call (the active LoRAs)."""

    cache: TextEmbeddingCache
    scope: Hashable = ()


@dataclass
class Chunk:
    """One encoder input: CHUNK_LENGTH + 2 token ids and a weight per position, and the textual-inversion embeddings
    it uses (position in the chunk's tokens, before BOS; their placeholder ids are 0, as A1111's)."""

    ids: list[int]
    weights: list[float]
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)

    def fix_key(self) -> tuple:
        return tuple((offset, emb.ident) for offset, emb in self.fixes)


class _Tokens:
    """The special ids of one CLIP tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bos: int = tokenizer.bos_token_id
        self.eos: int = tokenizer.eos_token_id
        self.pad: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        comma = tokenizer.convert_tokens_to_ids(",</w>")
        self.comma: int | None = None if comma in (None, tokenizer.unk_token_id) else comma

    def chunk(self, ids: list[int], weights: list[float], fixes: list | None = None) -> Chunk:
        fill = CHUNK_LENGTH - len(ids)
        return Chunk(
            [self.bos, *ids, self.eos] + [self.pad] * fill, [1.0, *weights, 1.0] + [1.0] * fill, list(fixes or [])
        )

    def empty(self) -> Chunk:
        return self.chunk([], [])


def tokenize_chunks(
    tokenizer, text: str, comma_backtrack: int = COMMA_BACKTRACK, embeddings: TokenTable | None = None
) -> list[Chunk]:
    """The chunks of one prompt (at least one), as A1111's `tokenize_line`. With `embeddings`, the tokens of an
    embedding's name become its vectors' placeholders (a name never straddles two chunks)."""
    tok = _Tokens(tokenizer)
    parsed = parse_prompt_attention(text)
    # verbose=False: no "sequence longer than 77" warning, chunking is the point.
    tokenized = tokenizer([t for t, _ in parsed], truncation=False, add_special_tokens=False, verbose=False)
    tokenized = tokenized["input_ids"]
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, Embedding]] = []
    last_comma = -1

    def flush() -> None:
        nonlocal ids, weights, fixes, last_comma
        chunks.append(tok.chunk(ids, weights, fixes))
        ids, weights, fixes, last_comma = [], [], [], -1

    for fragment, fragment_ids in zip(parsed, tokenized, strict=True):
        if is_break(fragment):
            flush()
            continue
        position = 0
        while position < len(fragment_ids):
            token = fragment_ids[position]
            if token == tok.comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_LENGTH and 0 <= last_comma and CHUNK_LENGTH - last_comma <= comma_backtrack:
                # Keep the words after the last comma together: they start the next chunk (with their embeddings,
                # where A1111 leaves those behind in the full chunk).
                cut = last_comma + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                moved_fixes = [(o - cut, e) for o, e in fixes if o >= cut]
                ids, weights, fixes = ids[:cut], weights[:cut], [(o, e) for o, e in fixes if o < cut]
                flush()
                ids, weights, fixes = moved_ids, moved_weights, moved_fixes
            if len(ids) == CHUNK_LENGTH:
                flush()
            emb = embeddings.find(fragment_ids, position) if embeddings is not None else None
            if emb is None:
                ids.append(token)
                weights.append(fragment[1])
                position += 1
                continue
            n = min(int(emb.vectors.shape[0]), CHUNK_LENGTH)
            if len(ids) + n > CHUNK_LENGTH:
                flush()
            fixes.append((len(ids), emb))
            ids.extend([0] * n)
            weights.extend([fragment[1]] * n)
            position += len(emb.ids)
    if ids or not chunks:
        flush()
    return chunks


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis per row: z *= weights, then rescale so the mean is what it was.

    Rows whose weights are all 1 are returned untouched (bit for bit).
    """
    weighted = (weights != 1.0).any(dim=1)
    if not bool(weighted.any()):
        return z
    z32 = z.float()
    old_mean = z32.mean(dim=(1, 2), keepdim=True)
    scaled = z32 * weights.to(z32)[..., None]
    new_mean = scaled.mean(dim=(1, 2), keepdim=True)
    scaled = scaled * torch.where(new_mean == 0, 1.0, old_mean / new_mean)
    return torch.where(weighted[:, None, None], scaled.to(z.dtype), z)


def _chunk_all(
    tokenizers: list, texts: list[str], tables: list[TokenTable | None] | None = None
) -> list[list[list[Chunk]]]:
    """Per tokenizer, the chunks of each text, all padded with empty chunks to one common count."""
    tables = tables or [None] * len(tokenizers)
    per_tok = [
        [tokenize_chunks(tok, t, embeddings=table) for t in texts]
        for tok, table in zip(tokenizers, tables, strict=True)
    ]
    n = max(len(c) for per_text in per_tok for c in per_text)
    return [
        [c + [_Tokens(tok).empty() for _ in range(n - len(c))] for c in per_text]
        for tok, per_text in zip(tokenizers, per_tok, strict=True)
    ]


def _encode(
    encoder,
    chunked: list[list[Chunk]],
    device: torch.device,
    hidden: Callable[[Any], torch.Tensor],
    all_layers: bool,
    cache: CacheScope | None = None,
    layer: Hashable = "last",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states (texts, 77 * chunks, C) with emphasis applied, and the pooled output of each text's first chunk
    (None if the encoder has no projection). `hidden` picks the hidden states from the encoder output; `all_layers`
    asks the encoder for every layer's. Chunks are encoded independently of each other, so with a `cache` only the
    chunks it lacks go through the encoder (`layer` names what `hidden` reads, for the cache key)."""
    n_texts, n_chunks = len(chunked), len(chunked[0])
    scope = cache.scope if cache is not None else None
    keys = [(id(encoder), layer, scope, tuple(ch.ids), tuple(ch.weights), ch.fix_key()) for c in chunked for ch in c]
    chunk_of = dict(zip(keys, (ch for c in chunked for ch in c), strict=True))  # one chunk per distinct key
    rows: dict[Hashable, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for key in chunk_of if cache is not None else ():
        found = cache.cache.get(key)
        if found is not None:
            rows[key] = (found[0], found[1])
    missing = [key for key in chunk_of if key not in rows]
    if missing:
        ids = torch.tensor([chunk_of[key].ids for key in missing], device=device)
        weights = torch.tensor([chunk_of[key].weights for key in missing], device=device)
        with fixes_applied(encoder, [chunk_of[key].fixes for key in missing]):
            out = encoder(ids, output_hidden_states=all_layers)
        z = apply_emphasis(hidden(out), weights)
        pooled = getattr(out, "text_embeds", None)
        for j, key in enumerate(missing):
            rows[key] = (z[j], None if pooled is None else pooled[j])
            if cache is not None:
                cache.cache.put(key, rows[key])
    z = torch.stack([rows[key][0] for key in keys])
    z = z.reshape(n_texts, n_chunks * z.shape[1], z.shape[2])
    first = [rows[key][1] for key in keys[::n_chunks]]  # each text's first chunk
    return z, None if first[0] is None else torch.stack(first)


def _table(embeddings: TextualInversions | None, tokenizer, encoder, key: str | None) -> TokenTable | None:
    if embeddings is None:
        return None
    return embeddings.table(tokenizer, key, encoder.get_input_embeddings().embedding_dim)


def _unique(texts: list[str]) -> tuple[list[str], list[int]]:
    """Distinct texts (a batch often repeats one prompt, negatives are often all "") and where each input maps."""
    order = list(dict.fromkeys(texts))
    index = {t: i for i, t in enumerate(order)}
    return order, [index[t] for t in texts]


@torch.no_grad()
def encode_sd15(
    pipe: DiffusionPipeline,
    prompts: list[str],
    negatives: list[str],
    clip_skip: int = 1,
    cache: CacheScope | None = None,
    embeddings: TextualInversions | None = None,
) -> dict[str, torch.Tensor]:
    """`prompt_embeds` / `negative_prompt_embeds` for a StableDiffusion*Pipeline call, one row per image.

    `clip_skip` is A1111's "Clip skip" (1 = last layer; 2 = the penultimate one through the final layer norm).
    """
    encoder = pipe.text_encoder

    def hidden(out: Any) -> torch.Tensor:
        if clip_skip <= 1:
            return out.last_hidden_state
        # transformers 5 flattened CLIPTextModel (no `.text_model`); older releases nest it.
        return getattr(encoder, "text_model", encoder).final_layer_norm(out.hidden_states[-clip_skip])

    texts, index = _unique(prompts + negatives)
    (chunked,) = _chunk_all([pipe.tokenizer], texts, [_table(embeddings, pipe.tokenizer, encoder, None)])
    z, _ = _encode(encoder, chunked, pipe._execution_device, hidden, clip_skip > 1, cache, ("clip_skip", clip_skip))
    z = z[index]
    return {"prompt_embeds": z[: len(prompts)], "negative_prompt_embeds": z[len(prompts) :]}


@torch.no_grad()
def encode_sdxl(
    pipe: DiffusionPipeline,
    prompts: list[str],
    negatives: list[str],
    cache: CacheScope | None = None,
    embeddings: TextualInversions | None = None,
) -> dict[str, torch.Tensor]:
    """`prompt_embeds`, `negative_prompt_embeds`, `pooled_prompt_embeds`, `negative_pooled_prompt_embeds` for a
    StableDiffusionXL*Pipeline call, one row per image.

    With every negative empty and the model's `force_zeros_for_empty_prompt`, the negative embeddings are zeros, as
    diffusers does.
    """
    named = [(pipe.tokenizer, pipe.text_encoder, "clip_l"), (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")]
    named = [(t, e, k) for t, e, k in named if t is not None and e is not None]  # the refiner has only the second one
    pairs = [(t, e) for t, e, _ in named]
    tables = [_table(embeddings, t, e, k) for t, e, k in named]
    zero_negative = not any(negatives) and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
    texts, index = _unique(prompts if zero_negative else prompts + negatives)
    hidden, pooled = [], None
    for chunked, (_, encoder) in zip(_chunk_all([t for t, _ in pairs], texts, tables), pairs, strict=True):
        # The penultimate layer without the final layer norm, as diffusers and A1111 do for SDXL.
        z, pooled = _encode(
            encoder, chunked, pipe._execution_device, lambda out: out.hidden_states[-2], True, cache, "penultimate"
        )
        hidden.append(z)
    if pooled is None:
        raise ValueError("the last SDXL text encoder must have a projection (CLIPTextModelWithProjection)")
    z = torch.cat(hidden, dim=-1)[index]
    pooled = pooled[index]
    b = len(prompts)
    if zero_negative:  # one zero row per negative (composable prompts have more prompt rows than negatives)
        return {
            "prompt_embeds": z,
            "negative_prompt_embeds": z.new_zeros((len(negatives), *z.shape[1:])),
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": pooled.new_zeros((len(negatives), *pooled.shape[1:])),
        }
    return {
        "prompt_embeds": z[:b],
        "negative_prompt_embeds": z[b:],
        "pooled_prompt_embeds": pooled[:b],
        "negative_pooled_prompt_embeds": pooled[b:],
    }
