"""GenPicz-style API (seed 001): /v1/generate, /v1/generations, /v1/styles."""

from __future__ import annotations

from fastapi import FastAPI

__all__ = ["install"]


def install(app: FastAPI) -> None:
    """TODO(#4): routes and the error renderer."""
