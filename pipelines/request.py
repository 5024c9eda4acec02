"""The one contract between the HTTP side and the GPU side.

Dialects build a `GenerationRequest`, the engine returns a `GenerationResult`. Nothing here imports torch,
so `server/` can use these types freely.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pipelines.control_units import ControlUnit
from pipelines.errors import InvalidRequest
from pipelines.hires import HiresOptions

# Seeds are stored as signed 64-bit integers (each image's seed in the job database) and image i uses seed + i:
# a request whose last seed would not fit is refused before any work, not after its images are made.
MAX_STORABLE_SEED = 2**63 - 1


def seed_problem(seed: int | None, images: int) -> str | None:
    """Why `seed` cannot be used for `images` images, or None. Negative seeds mean "random"."""
    if seed is None or seed < 0:
        return None
    if seed + max(images, 1) - 1 > MAX_STORABLE_SEED:
        return f"must be -1 (random) or between 0 and {MAX_STORABLE_SEED - max(images, 1) + 1} for {images} image(s)"
    return None


class Task(str, enum.Enum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    EDIT = "edit"  # instruction editing of an input image (Qwen-Image-Edit)


@dataclass
class InpaintOptions:
    """A1111-style inpainting knobs; pure image preparation, applied around the pipeline call."""

    mask_blur: int = 4
    mask_blur_y: int | None = None  # vertical blur when it differs from the horizontal `mask_blur` (A1111 x/y)
    inpainting_fill: int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    full_res: bool = True  # "only masked": crop around the mask, inpaint at full size, paste back
    full_res_padding: int = 0
    invert: bool = False
    composite_original: bool = True  # paste the original back outside the mask, as A1111 does


@dataclass(frozen=True)
class LoraRef:
    """A LoRA to apply to one request: a name from the Lora directory (file stem or alias) and its strength.

    `weight` scales the denoiser (UNet/transformer) part; `te_weight` the text-encoder part, None meaning the same as
    `weight` (A1111's `<lora:name:te:unet>` sets them apart; `<lora:name:w>` sets both).
    """

    name: str
    weight: float = 1.0
    te_weight: float | None = None


# The smallest img2img / inpaint denoising strength that runs. families.schedule_steps lengthens the schedule to
# ceil(1 / strength) steps so that one denoising step remains, and 1000 (the training timesteps) is the longest
# schedule every scheduler accepts (DDIM refuses more). A lower strength, 0 included (diffusers then has no step to
# run), is raised to this: one step at the lowest noise, the input nearly unchanged, as A1111 gives for 0.
MIN_DENOISING_STRENGTH = 1e-3


@dataclass
class GenerationRequest:
    """One unit of work, dialect-agnostic.

    `seed` is the first seed; image i of the request uses `seed + i` (A1111 rule). -1 means random: the engine
    resolves it and reports the seeds it used in the result. `batch_size` images are made per pipeline call,
    `n_iter` calls are made one after another.
    """

    model: str
    prompt: str
    task: Task = Task.TXT2IMG
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 7.0
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    sampler: str | None = None  # A1111 sampler name, e.g. "DPM++ 2M" or legacy "DPM++ 2M Karras"
    schedule: str | None = None  # A1111 schedule name/label, e.g. "karras"; None = automatic
    strength: float = 0.75  # img2img / inpaint denoising strength
    init_images: list[Image.Image] = field(default_factory=list)
    mask: Image.Image | None = None  # white = repaint
    inpaint: InpaintOptions = field(default_factory=InpaintOptions)
    resize_mode: int = 0  # A1111: 0 just resize, 1 crop and resize, 2 resize and fill
    # LoRAs from structured fields. `<lora:name:w>` tags in the prompt stay in `prompt` (the infotext shows it as
    # sent) and are added to these by the family adapter (`pipelines.prompts.request_loras`).
    loras: list[LoraRef] = field(default_factory=list)
    # A1111 generates when a named LoRA is missing (and says so); other dialects refuse the request (422).
    skip_missing_loras: bool = False
    # Live previews every N denoising steps (0: none), on the job's progress (pipelines.previews).
    preview_every: int = 0
    hires: HiresOptions | None = None  # A1111 hires fix (txt2img): upscale, then a second img2img pass
    # A1111 variation seeds (pipelines.variation): image i's noise is slerp(strength, noise(seed+i),
    # noise(subseed+i)); `seed_resize_from_w/h` > 0 make that noise at another size, pasted centred. -1: random.
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    # A1111 "Clip skip" (option CLIP_stop_at_last_layers): SD1.x reads its text encoder this many layers from the end
    # (1: the last). SDXL always reads the penultimate layer, as A1111's SDXL does.
    clip_skip: int = 1
    # A1111 `tiling`: seamless images (circular padding in the denoiser's and the VAE's convolutions, this call only).
    tiling: bool = False
    # A1111 SDXL refiner: the model (registry id or name) that takes over at `refiner_switch_at` of the denoising
    # (the base stops with diffusers' `denoising_end`, the refiner goes on from its latents with `denoising_start`).
    refiner: str | None = None
    refiner_switch_at: float = 0.8
    # Set on a hires second pass: the first pass's steps, so prompt editing counts on from them as A1111 does.
    prompt_schedule_base_steps: int | None = None
    # `background: transparent`: the finished images get alpha from models.yaml's `background_removal` model (RGBA).
    transparent_background: bool = False
    # ControlNet units (the A1111 ControlNet extension's), each with its detected map at the output size.
    control_units: list[ControlUnit] = field(default_factory=list)
    # Free-form tags the dialect wants echoed back (never read by the GPU side).
    tags: dict[str, Any] = field(default_factory=dict)
    # When the request stops being worth running: absolute wall-clock time, `time.time()` seconds since the epoch
    # (a dialect with a client timeout sets `time.time() + timeout`). None: the engine sets submit time +
    # `request_timeout_s`, so every request has one. Past it, queued work is dropped before it reaches the device
    # and running work stops at the next denoising step; either fails with `DeadlineExceeded` (HTTP 504).
    deadline: float | None = None

    def __post_init__(self) -> None:
        # Every dialect builds one of these: an unstorable seed is refused here, as a 422 naming `seed`.
        if (why := seed_problem(self.seed, self.total_images)) is not None:
            raise InvalidRequest("seed", why)

    @property
    def total_images(self) -> int:
        return self.batch_size * self.n_iter


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]  # one per returned image
    model: str  # model id that ran
    model_hash: str | None  # short hash reported in infotext, if known
    sampler: str  # normalized A1111 sampler name that ran (e.g. "DPM++ 2M")
    schedule: str  # A1111 schedule label that ran (e.g. "Karras", "Automatic")
    width: int
    height: int
    steps: int
    interrupted: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # queued_s, load_s, prepare_s, run_s
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Progress:
    """Snapshot of a job's progress, safe to read from any thread."""

    job_no: int = 0  # index of the pipeline call (n_iter) in progress
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started_at: float | None = None
    # The latest live preview (pipelines.previews: 1/8 of the image size) and the step it shows; None until one.
    preview: Image.Image | None = None
    preview_step: int = 0
    # The last few previews as (step, image), oldest first: a watcher that looks less often than steps go by (OpenAI
    # `partial_images`) still gets each one.
    recent_previews: tuple[tuple[int, Image.Image], ...] = ()

    @property
    def fraction(self) -> float:
        if self.job_count == 0 or self.sampling_steps == 0:
            return 0.0
        done = self.job_no / self.job_count + self.sampling_step / self.sampling_steps / self.job_count
        return min(done, 1.0)


# Live preview schedule (torch-free, so the HTTP side can plan previews; pipelines.previews makes them).


def wants_preview(step: int, total: int, every: int) -> bool:
    """Whether a job previewing every `every` steps (0: never) wants one after `step` of `total`. Never after the last
    step: the real image follows at once."""
    return every > 0 and step % every == 0 and step < total


def evenly(steps: int, count: int) -> int:
    """The interval giving about `count` previews over `steps` steps (OpenAI's `partial_images`)."""
    return 0 if count <= 0 else max(1, -(-steps // (count + 1)))
