"""What diffusers, transformers and huggingface_hub print, made fit for a server's log.

- Their progress bars (tqdm, carriage returns and escape codes) are turned off when stderr is not a terminal; the
  engine logs a line per loaded component instead (`describe_components`).
- transformers warns once per process that an image processor "requires torchvision" and falls back to its PIL
  implementation. Easel does not install torchvision on purpose (the PIL processors do what the pipelines need), so
  that fallback is the intended path: the message goes to the debug level instead of every start-up.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("easel.pipelines")

_PIL_FALLBACK = "requires torchvision (not installed); falling back to"
_installed = False


class _PilFallbackToDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and _PIL_FALLBACK in record.getMessage():
            log.debug("transformers: %s", record.getMessage())
            return False
        return True


def install_filters() -> None:
    """Before transformers is imported (the fallback warns while diffusers imports it); touches only `logging`."""
    global _installed
    if not _installed:
        logging.getLogger("transformers.utils.import_utils").addFilter(_PilFallbackToDebug())
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
