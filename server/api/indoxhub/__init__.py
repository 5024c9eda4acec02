"""IndoxHub-style POST /api/v1/images/generations (seed 002)."""

from __future__ import annotations

from fastapi import FastAPI

__all__ = ["install"]


def install(app: FastAPI) -> None:
    """TODO(#4): routes and the error renderer."""
