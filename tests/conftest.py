"""Shared fixtures. Everything runs offline on CPU with the tiny demo models, built once per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Apps built without an explicit data_dir must not write into the checkout's ./data.
os.environ.setdefault("EASEL_DATA_DIR", __import__("tempfile").mkdtemp(prefix="easel-test-data-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory per session; demo models are built into data_dir/demo-models on first use."""
    return tmp_path_factory.mktemp("easel-data")


@pytest.fixture(scope="session")
def demo_root(data_dir: Path) -> Path:
    return data_dir / "demo-models"


@pytest.fixture(scope="session")
def registry():
    from pipelines.registry import load_registry

    return load_registry(REPO_ROOT / "models.yaml")
