"""What diffusers, transformers and huggingface_hub print, made fit for a server's log.

- Their progress bars (tqdm, carriage returns and escape codes) are turned off when stderr is not a terminal; the
  engine logs a line per loaded component instead (`describe_components`).
- transformers warns once per process that an image processor "requires torchvision" and falls back to its PIL
  implementation. Easel does not install torchvision on purpose (the PIL processors do what the pipelines need), so
  that fallback is the intended path: the message goes to the debug level instead of every start-up.
- bitsandbytes (the [nf4] extra, and [dev]) warns on import, on a machine without CUDA, that an optional CPU kernel
  package is missing. Easel runs bitsandbytes' 4-bit layers only on CUDA and decodes 4-bit files itself elsewhere, so
  that warning goes to the debug level too.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("easel.pipelines")

_EXPECTED_WARNINGS = {  # logger -> (a part of the message, the library named in the debug line)
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to", "transformers"),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward", "bitsandbytes"),
}
_installed = False


class _ExpectedWarningToDebug(logging.Filter):
    def __init__(self, message_part: str, library: str) -> None:
        super().__init__()
        self.message_part, self.library = message_part, library

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and self.message_part in record.getMessage():
            log.debug("%s: %s", self.library, record.getMessage())
            return False
        return True


def install_filters() -> None:
    """Before transformers and bitsandbytes are imported (they warn while diffusers and peft import them); touches
    only `logging`."""
    global _installed
    if not _installed:
        for logger, (message_part, library) in _EXPECTED_WARNINGS.items():
            logging.getLogger(logger).addFilter(_ExpectedWarningToDebug(message_part, library))
        _installed = True


def quiet_libraries(progress_bars: bool | None = None) -> None:
    """The filters, and progress bars only on a terminal unless `progress_bars` says otherwise."""
    install_filters()
    if progress_bars is None:
        progress_bars = sys.stderr.isatty()
    if progress_bars:
        return
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()


def describe_components(components: dict[str, Any]) -> list[str]:
    """One line per component of a loaded pipeline: its class, and for modules the parameters, bytes, dtype and
    device they hold."""
    import torch

    lines = []
    for name, component in components.items():
        if component is None:
            continue
        kind = type(component).__name__
        if isinstance(component, torch.nn.Module):
            params = list(component.parameters())
            count = sum(p.numel() for p in params)
            size = sum(p.numel() * p.element_size() for p in params) + sum(
                b.numel() * b.element_size() for b in component.buffers()
            )
            first = params[0] if params else None
            where = f", {str(first.dtype).removeprefix('torch.')} on {first.device}" if first is not None else ""
            lines.append(f"{name}: {kind}, {_count(count)} parameters, {_bytes(size)}{where}")
        else:
            lines.append(f"{name}: {kind}")
    return lines


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
