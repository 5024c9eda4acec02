"""Which work can share one pipeline call.

Requests batch together when everything that shapes the denoising loop is equal: model, task, size, steps,
sampler and schedule, guidance, strength, variation-seed strength and seed resize, tiling, the LoRAs
(structured or `<lora:...>` tags, which are active for a whole call), and whether the prompt is an A1111 composable
(`AND`) one. Prompts, negative prompts and seeds may differ (each image keeps its own generator). ControlNet requests
share a call only with requests whose units use the same models with the same weights, modes and windows (their
control images may differ: each image gets its own); IP-Adapter requests run alone. Hires and refiner requests run
alone (two passes). Inpainting and instruction edits carry per-request masks / reference images that the pipelines
take once per call, so they never share a call with another request. Deadlines may differ too: a request past its
deadline leaves a shared call on its own (the engine fails it at the next step and drops its images).
"""

from __future__ import annotations

from collections.abc import Hashable

from pipelines.prompts import clean_prompts, is_composable, request_loras
from pipelines.request import GenerationRequest, Task
from pipelines.sampler_names import SamplerChoice

BATCHABLE_TASKS = frozenset({Task.TXT2IMG, Task.IMG2IMG})


def batch_key(job_id: str, req: GenerationRequest, choice: SamplerChoice) -> Hashable:
    """Equal keys may share a pipeline call; a unique key runs alone."""
    if req.task not in BATCHABLE_TASKS or req.hires is not None or req.refiner:  # two passes of their own
        return ("alone", job_id)
    if any(unit.is_ip_adapter for unit in req.control_units):  # its image prompt goes into the UNet for one call
        return ("alone", job_id)
    return (
        req.model,
        req.task,
        req.width,
        req.height,
        req.steps,
        choice.name,
        choice.schedule,
        req.guidance,
        req.strength if req.task == Task.IMG2IMG else None,
        # SDXL encodes an empty negative prompt as zeros and a non-empty one through the text encoders: a call
        # cannot do both, so empty and non-empty negatives (once extra-network tags are removed) do not mix.
        bool(clean_prompts(req)[1]),
        request_loras(req),
        req.skip_missing_loras,
        # Variation noise is made by hand (pipelines.variation) and tiling switches the convolutions of the call.
        (req.subseed_strength, req.seed_resize_from_w, req.seed_resize_from_h),
        req.tiling,
        req.clip_skip,
        # A1111 `AND` prompts run through a UNet wrapper that evaluates each part (pipelines.composable); plain
        # prompts never go through it. Composable requests with different numbers of parts do share a call.
        is_composable(clean_prompts(req)[0]),
        tuple(unit.batch_key() for unit in req.control_units),
    )
