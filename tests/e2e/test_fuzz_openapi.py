"""Schemathesis fuzz of the whole OpenAPI schema (every dialect) against a real `easel serve`: no request gets a 5xx.

scripts/fuzz.py does the work (it documents what counts as a finding: any 5xx, a dropped or hung request, a server
that is not live and ready afterwards). This test runs it with a few examples per operation, positive and negative
data, a fixed seed, against its own server with tight limits (at most 2 steps, 128x128, 2 images), so in-range
requests are cheap on CPU and out-of-range ones are refused with 4xx. `python scripts/fuzz.py` runs more examples.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.e2e

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
MAX_EXAMPLES = 3  # per operation and mode: about 500 requests, 1-2 minutes on 2 CPU cores


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
def fuzz_server(fuzz: ModuleType, demo_root: Path) -> Iterator[object]:
    with fuzz.local_server(fuzz.FUZZ_ENV, demo_models=demo_root, startup_timeout_s=300) as server:
        yield server


def test_no_operation_answers_5xx(fuzz: ModuleType, fuzz_server: object) -> None:
    report = fuzz.run_fuzz(fuzz_server.url, max_examples=MAX_EXAMPLES, seed=0, timeout_s=120)
    summary = fuzz.format_report(report)
    tracebacks = "\n".join(fuzz.server_tracebacks(fuzz_server.log))
    print(summary)
    assert not report.findings, f"{summary}\n{tracebacks}"
    assert not [e for op in report.operations for e in op.generation_errors], summary  # nothing left unfuzzed
    # The fuzz reached every dialect and got answers, valid requests included (2xx), not only refusals.
    labels = {op.operation for op in report.operations}
    for path in ("/sdapi/v1/txt2img", "/v2/image/flux/generate", "/v1/images/generations", "/v1/generate"):
        assert f"POST {path}" in labels
    assert "POST /image/create" in labels and "POST /api/v1/images/generations" in labels
    classes = report.status_classes()
    assert classes["2xx"] > 50 and classes["4xx"] > 50, summary
    assert report.health_after == {"/livez": 200, "/readyz": 200}
