"""OpenAI Images: /v1/images/generations, /v1/images/edits, /v1/models (errors in OpenAI's shape)."""

from __future__ import annotations

from fastapi import FastAPI

__all__ = ["install"]


def install(app: FastAPI) -> None:
    """TODO(#4): routes and the error renderer."""
