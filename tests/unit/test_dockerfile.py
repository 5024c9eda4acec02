"""Dockerfile.cuda is not built here (no network, no docker): check the instructions a deployment relies on."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        name, _, args = full.partition(" ")
        out.append((name.upper(), args.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((REPO_ROOT / "Dockerfile.cuda").read_text())


def args_of(dockerfile: list[tuple[str, str]], name: str) -> list[str]:
    return [a for n, a in dockerfile if n == name]


def test_cuda_runtime_base_with_version_build_arg(dockerfile: list[tuple[str, str]]) -> None:
    (base,) = args_of(dockerfile, "FROM")
    assert re.fullmatch(r"nvidia/cuda:\$\{CUDA_VERSION\}-runtime-ubuntu\$\{UBUNTU_VERSION\}", base)
    before_from = dockerfile[: dockerfile.index(("FROM", base))]
    declared = {a.split("=")[0] for n, a in before_from if n == "ARG"}
    assert {"CUDA_VERSION", "UBUNTU_VERSION"} <= declared


def test_torch_comes_from_the_cuda_index_then_the_cuda_extra(dockerfile: list[tuple[str, str]]) -> None:
    stage = dockerfile[[n for n, _ in dockerfile].index("FROM") :]
    assert any(a.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cu") for n, a in stage if n == "ARG")
    runs = args_of(dockerfile, "RUN")
    torch_run = next(r for r in runs if re.search(r"pip install --index-url \"?\$\{TORCH_INDEX_URL\}\"? \"?torch", r))
    extra_run = next(r for r in runs if re.search(r'"?\.\[cuda[],]', r))
    assert runs.index(torch_run) < runs.index(extra_run)
    assert "--constraint" in extra_run  # the extra must not swap the CUDA torch for a PyPI one


def test_runs_as_a_non_root_user_after_installing(dockerfile: list[tuple[str, str]]) -> None:
    names = [n for n, _ in dockerfile]
    (user,) = args_of(dockerfile, "USER")
    assert user not in ("root", "0")
    last_run = max(i for i, n in enumerate(names) if n == "RUN")
    assert names.index("USER") > last_run


def test_models_and_data_are_volumes_and_settings_point_at_them(dockerfile: list[tuple[str, str]]) -> None:
    (volume,) = args_of(dockerfile, "VOLUME")
    assert set(json.loads(volume)) == {"/models", "/data"}
    env = {}
    for args in args_of(dockerfile, "ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            env[key] = value
    assert env["EASEL_DATA_DIR"] == "/data"
    assert env["EASEL_CHECKPOINTS_DIR"] == "/models"
    assert env["EASEL_CONFIGS_DIR"].startswith("/models")
    assert env["HF_HUB_OFFLINE"] == "1"  # nothing is ever downloaded at run time
    assert args_of(dockerfile, "EXPOSE") == [env["EASEL_PORT"]]


def test_healthcheck_probes_readyz(dockerfile: list[tuple[str, str]]) -> None:
    (health,) = args_of(dockerfile, "HEALTHCHECK")
    assert "CMD" in health and "/readyz" in health and "--start-period=" in health


def test_entrypoint_serves_on_all_interfaces(dockerfile: list[tuple[str, str]]) -> None:
    (entry,) = args_of(dockerfile, "ENTRYPOINT")
    assert json.loads(entry)[:4] == ["easel", "serve", "--host", "0.0.0.0"]
    assert 'easel = "server.cli:main"' in (REPO_ROOT / "pyproject.toml").read_text()  # the console script


def test_copied_paths_exist_and_dockerignore_keeps_the_context_small(dockerfile: list[tuple[str, str]]) -> None:
    for args in args_of(dockerfile, "COPY"):
        *sources, _dest = args.split()
        for src in sources:
            assert (REPO_ROOT / src).exists(), src
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "data", "**/*.safetensors", "**/*.ckpt"} <= ignored
    assert not ignored & {"pipelines", "server", "pyproject.toml", "README.md", "models.yaml"}
