"""Schemathesis fuzz of the whole OpenAPI schema (every dialect) against a real `easel serve`: no request gets a 5xx.

scripts/fuzz.py does the work and documents it: what counts as a finding (a 5xx other than the documented 501 of
A1111 interrogate, whose captioners are not installed, a dropped or hung request, a server not live and ready
afterwards) and the four modes
(positive, cheap: positive with cost fields pinned small and real input images, negative, hostile: cheap with one
field at an edge value such as a lone surrogate or a 64-bit limit). This test runs it with a
few examples per operation and mode and a fixed seed, against its own server with tight limits (2 steps, 512x512,
2 images), so valid requests are cheap on CPU and out-of-range ones are refused with 4xx. `python scripts/fuzz.py`
runs more examples.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
MAX_EXAMPLES = 5  # per operation and mode: about 420 requests, 35-50 s on 2 CPU cores
# hostile mode (lone surrogates, 64-bit edge numbers; issue #14): about 45 requests, 36 s measured on a shared and
# busy 2-core box; 3 per operation already find the surrogate 500s on the code before the fix
HOSTILE_EXAMPLES = 3


def load_fuzz() -> ModuleType:
    spec = importlib.util.spec_from_file_location("easel_fuzz_script", SCRIPTS / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz() -> ModuleType:
    return load_fuzz()


@pytest.fixture(scope="module")
def fuzz_server(fuzz: ModuleType, demo_root: Path) -> Iterator[Any]:
    with fuzz.local_server(fuzz.FUZZ_ENV, demo_models=demo_root, startup_timeout_s=300) as server:
        yield server


def test_no_operation_answers_5xx(fuzz: ModuleType, fuzz_server: Any) -> None:
    report = fuzz.run_fuzz(
        fuzz_server.url, max_examples=MAX_EXAMPLES, seed=0, timeout_s=120, mode_examples={"hostile": HOSTILE_EXAMPLES}
    )
    summary = fuzz.format_report(report)
    tracebacks = "\n".join(fuzz.server_tracebacks(fuzz_server.log))
    print(summary)
    assert not report.findings, f"{summary}\n{tracebacks}"
    assert not [e for op in report.operations for e in op.generation_errors], summary  # nothing left unfuzzed
    # Every dialect was fuzzed, and the cheap mode got valid requests through to the engine on every generation and
    # edit route (2xx), not only refusals. Genrex's sizes (1024 px and up) are above this server's 512 px limit:
    # its routes get 4xx here (scripts/fuzz.py --max-side 1536 generates them).
    answered = {op.operation: op.statuses for op in report.operations}
    assert len(answered) == len(schema_operations(fuzz_server.url)), "an operation was not fuzzed"
    for label in (
        "POST /sdapi/v1/txt2img",
        "POST /sdapi/v1/img2img",
        "POST /v2/automatic1111/sdapi/v1/img2img",
        "POST /v2/image/flux/generate",
        "POST /v2/image/qwen/generate",
        "POST /v2/image/qwen/edit",
        "POST /v2/image/gpt-image/generate",
        "POST /v2/image/gpt-image/edit",
        "POST /v2/image/gemini-3/generate",
        "POST /v1/images/generations",
        "POST /v1/images/edits",
        "POST /api/v1/images/generations",
        "POST /v1/generate",
    ):
        assert any(200 <= status < 300 for status in answered[label]), (label, answered[label])
    for label in ("POST /image/create", "POST /v1/image/create"):
        assert any(400 <= status < 500 for status in answered[label]), (label, answered[label])
    assert report.health_after == {"/livez": 200, "/readyz": 200}


def schema_operations(url: str) -> list[tuple[str, str]]:
    spec = httpx.get(f"{url}/openapi.json", timeout=30).json()
    return [(method, path) for path, item in spec["paths"].items() for method in item]
