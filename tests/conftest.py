"""Shared fixtures. Everything runs offline on CPU with the tiny demo models, built once per session."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent

# Everything a run writes lives under one folder, removed when the run ends: pytest's tmp paths, the data dir of apps
# built without one (never the checkout's ./data), torch.compile's cache and the Ray session of tests/ray. Servers
# started as subprocesses inherit the variables.
SESSION_ROOT = Path(tempfile.mkdtemp(prefix="easel-tests-"))
os.environ.setdefault("EASEL_DATA_DIR", str(SESSION_ROOT / "data"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(SESSION_ROOT / "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", str(SESSION_ROOT / "triton"))
os.environ.setdefault("RAY_TMPDIR", str(SESSION_ROOT / "ray"))


def free_port() -> int:
    """A loopback TCP port that was free a moment ago, for a server the test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config: pytest.Config) -> None:
    if config.option.basetemp is None:  # an explicit --basetemp is the caller's to keep
        config.option.basetemp = str(SESSION_ROOT / "pytest")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SESSION_ROOT, ignore_errors=True)


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


@pytest.fixture(scope="module")
def load(demo_root: Path):
    """`load(family)`: each family's demo model through its adapter, float32 on CPU, loaded once per test module."""
    import torch

    from pipelines import demo
    from pipelines.families import adapter_for
    from pipelines.registry import ModelSpec

    cache = {}

    def _load(family: str):
        if family not in cache:
            spec = ModelSpec(id=f"demo-{family}", family=family, source=f"demo:{family}")
            path = demo.ensure_demo_model(family, demo_root)  # shared with the engine and e2e tests
            cache[family] = adapter_for(family).load(spec, str(path), torch.device("cpu"), torch.float32)
        return cache[family]

    return _load
