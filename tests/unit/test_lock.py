"""requirements.lock (scripts/lock.py) agrees with pyproject.toml, and every documented install uses it."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def _load_lock_script():
    spec = importlib.util.spec_from_file_location("easel_lock_script", REPO / "scripts" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


lock = _load_lock_script()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def lock_text() -> str:
    return (REPO / "requirements.lock").read_text()


def test_the_lock_agrees_with_pyproject(pyproject: dict, lock_text: str) -> None:
    assert lock.disagreements(pyproject, lock_text) == []


def test_every_requirement_of_every_extra_is_pinned(pyproject: dict, lock_text: str) -> None:
    pinned = {pin.name for pin in lock.read_lock(lock_text)}
    for extra in ("dev", "ray", "postgres", "cuda"):
        assert extra in pyproject["project"]["optional-dependencies"]
    for req in lock.project_requirements(pyproject):
        assert lock.canonicalize_name(req.name) in pinned, req


def test_a_raised_lower_bound_is_caught(pyproject: dict, lock_text: str) -> None:
    changed = copy.deepcopy(pyproject)
    deps = changed["project"]["dependencies"]
    deps[[d.startswith("diffusers") for d in deps].index(True)] = "diffusers>=99"
    problems = lock.disagreements(changed, lock_text)
    assert any("diffusers" in p and "outside" in p for p in problems)
    assert problems[-1].endswith(f"`{lock.REFRESH_COMMAND}`")


def test_an_added_or_removed_dependency_is_caught(pyproject: dict, lock_text: str) -> None:
    added = copy.deepcopy(pyproject)
    added["project"]["dependencies"].append("left-pad>=1")
    assert any("left-pad" in p and "not in the lock" in p for p in lock.disagreements(added, lock_text))

    removed = copy.deepcopy(pyproject)
    removed["project"]["dependencies"] = [d for d in removed["project"]["dependencies"] if not d.startswith("psutil")]
    assert any("psutil" in p and "no longer" in p for p in lock.disagreements(removed, lock_text))


def test_torch_is_the_tested_release_and_its_cuda_packages_stay_out(pyproject: dict, lock_text: str) -> None:
    assert re.search(rf"^torch=={re.escape(lock.TESTED_TORCH)}$", lock_text, re.M)
    assert not re.search(r"^(nvidia-|cuda-|triton==)", lock_text, re.M)
    repinned = lock_text.replace(f"torch=={lock.TESTED_TORCH}", "torch==2.99.0")
    assert any("torch" in p for p in lock.disagreements(pyproject, repinned))


def test_the_incompatible_transformers_peft_pair_is_excluded(pyproject: dict, lock_text: str) -> None:
    """transformers 5.24+ needs peft >= 0.22 for adapters; the range stops below it while no such peft exists."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    (transformers,) = [Requirement(d) for d in pyproject["project"]["dependencies"] if d.startswith("transformers")]
    peft_pins = [p.version for p in lock.read_lock(lock_text) if p.name == "peft"]
    assert peft_pins
    if all(v < Version("0.22") for v in peft_pins):
        assert Version("5.24.0") not in transformers.specifier
        assert any(p.version < Version("5.24") for p in lock.read_lock(lock_text) if p.name == "transformers")


def test_documented_installs_use_the_lock() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    docker = (REPO / "Dockerfile.cuda").read_text()
    setup, test = re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", readme)[:2]
    for command in (setup, test):
        assert "pip install -c requirements.lock torch==2.13.0" in command
        assert "pip install -c requirements.lock -e" in command
    assert "python -m pytest" in test
    assert "LOCK=(-c requirements.lock)" in ci and '"${LOCK[@]}" -e ".[dev,ray]"' in ci
    assert "--constraint requirements.lock" in docker
    assert "COPY pyproject.toml README.md models.yaml requirements.lock" in docker
    assert f"ARG TORCH_VERSION={lock.TESTED_TORCH}" in docker
