"""Genrex-style job API (seed 000): /image/create, /image/status/{uuid} (also under /v1)."""

from __future__ import annotations

from fastapi import FastAPI

__all__ = ["install"]


def install(app: FastAPI) -> None:
    """TODO(#4): routes and the error renderer."""
