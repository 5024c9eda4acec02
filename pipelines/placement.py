"""`performance.offload: auto`: where a loaded pipeline's components go, from the bytes they hold and the device's free
memory, in order of speed:

1. resident: everything on the device;
2. text-encoders: the text encoders wait on the CPU and visit the device only to encode (moved back before the
   denoiser runs), the denoiser and VAE resident: the big T5/Qwen2.5-VL encoders of FLUX and Qwen-Image;
3. model: diffusers' whole-model CPU offload (one component on the device at a time);
4. sequential: diffusers' sequential offload (layer by layer; slow, but needs only the largest layer);

and VAE tiling above the image size whose decode would not fit in what is left. Below even that the model is refused
at load with the bytes needed and free, instead of running out of memory in someone's request.

The free-memory probe is injectable (`set_probe`) so the choice is testable without a GPU; the pipeline cache installs
a `room_maker` around each load, which evicts least-recently-used pipelines when the best mode would not fit.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger("easel.placement")

MODES = ("resident", "text-encoders", "model", "sequential")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
GIB = 1 << 30
# Working memory beyond the weights: activations, attention, the CUDA context's share. A fraction of the denoiser
# (activations grow with it) with a floor; deliberately generous, as running short costs a failed request.
WORKING_FRACTION = 0.25
WORKING_FLOOR = GIB // 2
# VAE decode memory per output pixel (bytes, at 2 bytes per value): SDXL's VAE peaks near 3 GiB at 1024x1024 in fp16.
VAE_BYTES_PER_PIXEL = 3000

Probe = Callable[[torch.device], tuple[int, int]]  # device -> (free bytes, total bytes)


class PlacementError(RuntimeError):
    """The model cannot fit on the device even with sequential offload (the message has the bytes)."""


@dataclass(frozen=True)
class Footprint:
    """Bytes of weights per role, as loaded (on the CPU) before placement."""

    denoiser: int
    text_encoders: int
    vae: int
    other: int = 0
    largest_layer: int = 0  # the biggest single module's own parameters (sequential offload's floor)
    value_bytes: int = 2  # bytes per value of the compute dtype (scales the VAE's working memory)

    @property
    def total(self) -> int:
        return self.denoiser + self.text_encoders + self.vae + self.other

    @property
    def working(self) -> int:
        return max(WORKING_FLOOR, int(self.denoiser * WORKING_FRACTION))

    @property
    def resident(self) -> int:
        """Bytes everything on the device needs: the weights and the working memory."""
        return self.total + self.working


@dataclass(frozen=True)
class Placement:
    mode: str
    needed: int  # bytes this mode needs on the device
    free: int
    vae_tiling_above_pixels: int | None  # None: the decode fits at every size the server allows

    def describe(self, model_id: str, footprint: Footprint) -> str:
        tiling = (
            f"; VAE tiling above {self.vae_tiling_above_pixels} pixels"
            if self.vae_tiling_above_pixels is not None
            else ""
        )
        return (
            f"model {model_id}: offload auto chose '{self.mode}': needs {_gib(self.needed)} on the device "
            f"({_gib(footprint.total)} of weights, {_gib(footprint.working)} working), {_gib(self.free)} free{tiling}"
        )


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB ({n} bytes)"


def choose(footprint: Footprint, free: int, max_pixels: int = 4096 * 4096) -> Placement:
    """The fastest mode that fits in `free` bytes. Raises PlacementError when none does."""
    working = footprint.working
    needs = {
        "resident": footprint.resident,
        "text-encoders": footprint.denoiser + footprint.vae + footprint.other + working,
        "model": max(footprint.denoiser, footprint.text_encoders, footprint.vae) + working,
        "sequential": max(footprint.largest_layer, 1) + working,
    }
    for mode in MODES:
        if mode == "text-encoders" and footprint.text_encoders == 0:
            continue
        if needs[mode] <= free:
            spare = free - needs[mode]
            per_pixel = VAE_BYTES_PER_PIXEL * footprint.value_bytes // 2
            fits = spare // per_pixel
            tiling = None if fits >= max_pixels else max(256 * 256, int(fits))
            return Placement(mode, needs[mode], free, tiling)
    raise PlacementError(
        f"cannot fit even with sequential offload: needs at least {_gib(needs['sequential'])} on the device "
        f"({_gib(footprint.total)} of weights in all), {_gib(free)} free"
    )


def footprint_of(pipe, dtype: torch.dtype) -> Footprint:
    """Bytes each role of a loaded pipeline holds (parameters and buffers, in their stored dtypes)."""
    roles = {"denoiser": 0, "text_encoders": 0, "vae": 0, "other": 0}
    largest = 0
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        size = module_bytes(component)
        role = ("denoiser" if name in ("unet", "transformer") else "text_encoders" if name in TEXT_ENCODERS
                else "vae" if name == "vae" else "other")  # fmt: skip
        roles[role] += size
        for module in component.modules():
            own = sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))
            largest = max(largest, own)
    return Footprint(**roles, largest_layer=largest, value_bytes=torch.finfo(dtype).bits // 8)


def module_bytes(module: torch.nn.Module) -> int:
    return sum(_tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """A tensor's bytes, with a bitsandbytes 4-bit weight's block scales and code table (its quant_state)."""
    size = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        size += sum(v.numel() * v.element_size() for v in state.as_dict().values() if isinstance(v, torch.Tensor))
    return size


def cuda_probe(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes for this process: the card's free memory plus PyTorch's cached-but-unused blocks, within
    the per-process cap (`cuda_memory_fraction`, torch.cuda.set_per_process_memory_fraction) when one is set."""
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    free += max(0, reserved - allocated)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get_fraction is not None and (fraction := get_fraction(device)) < 1.0:
        cap = int(total * fraction)
        return max(0, min(free, cap - allocated)), cap
    return free, total


_probe: Probe = cuda_probe
_room_maker: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("room_maker", default=None)


def set_probe(probe: Probe | None) -> None:
    """Replace the free-memory probe (tests; None restores the CUDA one)."""
    global _probe
    _probe = probe or cuda_probe


def probe(device: torch.device) -> tuple[int, int]:
    return _probe(device)


@contextlib.contextmanager
def room_maker(evict_one: Callable[[], bool]) -> Iterator[None]:
    """During a load: `evict_one()` frees the least recently used other pipeline; False when none is left."""
    token = _room_maker.set(evict_one)
    try:
        yield
    finally:
        _room_maker.reset(token)


def plan(pipe, model_id: str, device: torch.device, dtype: torch.dtype) -> Placement:
    """The placement of a pipeline loaded on the CPU; evicts other pipelines while the fastest mode would not fit."""
    footprint = footprint_of(pipe, dtype)
    evict = _room_maker.get()
    while True:
        free, _total = probe(device)
        try:
            placement, error = choose(footprint, free), None
        except PlacementError as e:
            placement, error = None, e
        if placement is not None and placement.mode == "resident":
            break
        if evict is not None and evict():
            continue  # another pipeline was evicted: probe again
        if placement is None:
            raise PlacementError(f"model {model_id}: {error}")
        break
    log.info(placement.describe(model_id, footprint))
    return placement


def resident_with(pipe, denoiser_bytes: int, device: torch.device, dtype: torch.dtype) -> tuple[bool, int, int]:
    """Whether the pipeline would still be placed all resident, in the memory free now (nothing evicted), with its
    denoiser holding `denoiser_bytes`: (fits, bytes needed, bytes free)."""
    footprint = dataclasses.replace(footprint_of(pipe, dtype), denoiser=denoiser_bytes)
    free, _total = probe(device)
    return footprint.resident <= free, footprint.resident, free


def apply(pipe, placement: Placement, device: torch.device) -> None:
    """Put the pipeline where `placement` says."""
    if placement.mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif placement.mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif placement.mode == "text-encoders":
        from accelerate import cpu_offload_with_hook

        hooks = []
        for name, component in pipe.components.items():
            if not isinstance(component, torch.nn.Module):
                continue
            if name in TEXT_ENCODERS:
                _, hook = cpu_offload_with_hook(component, device)  # to the device when called, back on offload()
                hooks.append(hook)
            else:
                component.to(device)
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if denoiser is not None and hooks:

            def encoders_back_to_cpu(*_: object) -> None:  # before the denoiser runs, which needs their room
                for hook in hooks:
                    hook.offload()

            denoiser.register_forward_pre_hook(encoders_back_to_cpu)
    else:
        pipe.to(device)
    pipe._easel_offload = placement.mode  # noqa: SLF001  (LoadedModel.execution_device reads it)
    vae = getattr(pipe, "vae", None)
    if vae is not None:  # the VAE is shared by the derived pipelines: optimize.prepare_call reads it there
        vae._easel_tiling_above = placement.vae_tiling_above_pixels  # noqa: SLF001
