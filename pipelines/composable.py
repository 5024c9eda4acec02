"""A1111 composable prompts (`a cat AND a dog:0.5`) for SD1.5 and SDXL.

A1111 (`prompt_parser.get_multicond_prompt_list`, `sd_samplers_cfg_denoiser.combine_denoised`) encodes every `AND`
part of a prompt on its own (each with its own prompt-editing schedule), evaluates the denoiser for the negative
prompt and for every part, and combines

    denoised = uncond + sum_i w_i * cfg_scale * (cond_i - uncond)

The diffusers pipelines keep their own CFG (`uncond + g * (cond - uncond)`): `ComposedUNet` stands in for the UNet of
one call and answers the pipeline's "cond" half with `uncond + sum_i w_i * (cond_i - uncond)`, which the pipeline's
CFG turns into exactly A1111's formula (the combination is linear, so combining noise predictions equals combining
A1111's denoised images). With guidance <= 1 diffusers runs no CFG and the same combination is the model output, as
A1111's formula with a CFG scale of 1 (the scale Easel runs such requests at).

Each image of the call carries its own parts and weights, so requests with different numbers of parts share a call;
the UNet runs once per step on the images' negatives plus all their parts. Identical parts of one prompt are
evaluated once with their weights added, and parts whose weight is 0 are not evaluated: the result is the same as
A1111's, and a prompt left with one part of weight 1 gives that part's noise prediction unchanged, bit for bit.

Deviation: parts are padded to a common number of 75-token chunks with empty chunks, as Easel pads the prompts of a
batch (A1111 repeats the last token vector); they agree for parts within 75 tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from pipelines.prompt_schedules import schedules, text_at_step
from pipelines.prompts import SubPrompt

Encoder = Callable[[list[str], list[str]], dict[str, torch.Tensor]]


def merged(parts: list[SubPrompt]) -> list[SubPrompt]:
    """One entry per distinct text (weights added, first mention's order and spelling), zero weights dropped. Texts
    differing only in surrounding whitespace are one: the CLIP tokenizers drop it."""
    first: dict[str, str] = {}
    weights: dict[str, float] = {}
    for part in parts:
        key = part.text.strip()
        first.setdefault(key, part.text)
        weights[key] = weights.get(key, 0.0) + part.weight
    return [SubPrompt(first[key], w) for key, w in weights.items() if w != 0.0]


@dataclass
class StepConditioning:
    """The encoder outputs of one sampling step: each image's negative and every part of every image, in order
    (pooled: SDXL's pooled embeddings, None for SD1.5)."""

    uncond: torch.Tensor
    cond: torch.Tensor
    uncond_pooled: torch.Tensor | None = None
    cond_pooled: torch.Tensor | None = None


def encode_composed(
    encode: Encoder,
    parts: list[list[SubPrompt]],
    negatives: list[str],
    steps: int,
    loop_steps: int,
    base_steps: int | None = None,
) -> list[StepConditioning]:
    """The conditioning of sampling steps 0..loop_steps: `parts` holds each image's merged parts, `negatives` each
    image's negative prompt. Prompt editing and alternation are scheduled per part (and per negative), as A1111
    schedules each subprompt; all distinct step texts are encoded in one go, so they share one chunk count."""
    texts = [p.text for image in parts for p in image]
    r, n = len(texts), len(negatives)
    scheduled = schedules(texts + negatives, steps, base_steps)
    if scheduled is None:
        step_texts = [tuple(texts + negatives)]
    else:
        step_texts = [tuple(text_at_step(s, k) for s in scheduled) for k in range(loop_steps + 1)]
    configs = list(dict.fromkeys(step_texts))
    rows = max(r, 1)  # the encoders need a prompt: a call whose parts all weigh 0 encodes an unused ""
    encoded = encode(
        [t for c in configs for t in (c[:r] if r else ("",))],
        [t for c in configs for t in c[r:]],
    )
    pooled = "pooled_prompt_embeds" in encoded
    per_config = [
        StepConditioning(
            uncond=encoded["negative_prompt_embeds"][j * n : (j + 1) * n],
            cond=encoded["prompt_embeds"][j * rows : j * rows + r],
            uncond_pooled=encoded["negative_pooled_prompt_embeds"][j * n : (j + 1) * n] if pooled else None,
            cond_pooled=encoded["pooled_prompt_embeds"][j * rows : j * rows + r] if pooled else None,
        )
        for j in range(len(configs))
    ]
    return [per_config[configs.index(t)] for t in step_texts]


def placeholder_kwargs(first: StepConditioning) -> dict[str, torch.Tensor]:
    """Pipeline arguments of the right shapes; `ComposedUNet` replaces what the UNet reads from them."""
    kwargs = {"prompt_embeds": first.uncond, "negative_prompt_embeds": first.uncond}
    if first.uncond_pooled is not None:
        kwargs.update(pooled_prompt_embeds=first.uncond_pooled, negative_pooled_prompt_embeds=first.uncond_pooled)
    return kwargs


def install(view: Any, unet: ComposedUNet) -> None:
    """Put `unet` in the `unet` slot of a per-call pipeline view (`families.call_view`). Not through setattr, which
    would rewrite the view's config. The real UNet is put back before the pipeline re-arms CPU-offload hooks at the
    end of its call: diffusers' `maybe_free_model_hooks` hooks only the components that are modules, and the UNet
    would drop out of the offload chain."""
    real = view.unet
    view.__dict__["unet"] = unet

    def maybe_free_model_hooks() -> None:
        view.__dict__["unet"] = real
        type(view).maybe_free_model_hooks(view)

    view.__dict__["maybe_free_model_hooks"] = maybe_free_model_hooks


class ComposedUNet:
    """The UNet of one pipeline call with composable prompts. Everything but the call is the wrapped UNet's.

    The pipeline passes its latents as [uncond rows, cond rows] (CFG) or [cond rows]; this evaluates the UNet on
    each image's negative and each of its parts, and returns [uncond, combined] (or [combined]).
    """

    def __init__(self, unet: Any, weights: list[list[float]], per_step: list[StepConditioning]) -> None:
        self._unet = unet
        self.weights = weights
        self.per_step = per_step
        self.step = 0  # the sampling step the next call belongs to (set by the step callback)
        counts = torch.tensor([len(w) for w in weights])
        self._part_image = torch.repeat_interleave(torch.arange(len(weights)), counts)  # image of each part row

    def __getattr__(self, name: str) -> Any:  # config, dtype, add_embedding, ...
        if name == "_unet":
            raise AttributeError(name)
        return getattr(self._unet, name)

    def set_step(self, step: int) -> None:
        self.step = step

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        n = len(self.weights)
        total = sample.shape[0]
        if total not in (n, 2 * n):
            raise ValueError(f"composable prompts: {total} latent rows for {n} images")
        conds = self.per_step[min(self.step, len(self.per_step) - 1)]
        index = self._part_image.to(sample.device)

        def rows(t: Any) -> Any:
            """A per-row input as [uncond rows, one row per part]; anything else as it is."""
            if not isinstance(t, torch.Tensor) or t.ndim == 0 or t.shape[0] != total:
                return t
            uncond, cond = (t[:n], t[n:]) if total == 2 * n else (t, t)
            return torch.cat([uncond, cond[index]])

        like = encoder_hidden_states if encoder_hidden_states is not None else sample
        hidden = torch.cat([conds.uncond, conds.cond]).to(device=sample.device, dtype=like.dtype)
        added = None
        if added_cond_kwargs is not None:
            added = {k: rows(v) for k, v in added_cond_kwargs.items()}
            if conds.uncond_pooled is not None and conds.cond_pooled is not None:
                pooled = torch.cat([conds.uncond_pooled, conds.cond_pooled])
                added["text_embeds"] = pooled.to(device=sample.device, dtype=added["text_embeds"].dtype)
        out = self._unet(
            rows(sample),
            rows(timestep),
            *args,
            encoder_hidden_states=hidden,
            added_cond_kwargs=added,
            return_dict=False,
            **{k: rows(v) for k, v in kwargs.items()},
        )[0]
        uncond, parts = out[:n], out[n:]
        combined = []
        start = 0
        for j, weights in enumerate(self.weights):
            own = parts[start : start + len(weights)]
            start += len(weights)
            if weights == [1.0]:  # one part of weight 1: its own prediction, untouched
                combined.append(own[0])
                continue
            c = uncond[j].clone()
            for w, part in zip(weights, own, strict=True):
                c += w * (part - uncond[j])
            combined.append(c)
        result = torch.stack(combined) if combined else uncond[:0]
        if total == 2 * n:
            result = torch.cat([uncond, result])
        return UNet2DConditionOutput(sample=result) if return_dict else (result,)
