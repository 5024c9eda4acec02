"""Logging for the `easel` command: one format for Easel's, uvicorn's and the libraries' lines."""

from __future__ import annotations

import logging
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str = "info") -> None:
    """Root logging at `level`; uvicorn's loggers propagate to it (serve passes `log_config=None` to uvicorn)."""
    logging.basicConfig(level=level.upper(), format=TEXT_FORMAT, stream=sys.stderr, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def debugging() -> bool:
    """Tracebacks are for --log-level debug; everyone else gets one line."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)
