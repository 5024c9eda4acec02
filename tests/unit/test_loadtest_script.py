"""scripts/loadtest.py: refuses non-loopback targets before sending anything, parses its mix, and a few seconds of real
load against its own `easel serve` (demo models) pass with every request answered and every async job completed."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "loadtest.py"


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("easel_loadtest_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_only_loopback_targets() -> None:
    loadtest = load_script()
    for url in ("http://127.0.0.1:7860", "http://127.5.0.1:80", "http://[::1]:7860", "http://localhost:7860/"):
        assert loadtest.is_loopback_url(url), url
    for url in (
        "http://10.0.0.5:7860",
        "http://192.168.1.2",
        "http://example.com",
        "http://127.0.0.1.nip.io",  # a name, not an address: never resolved
        "http://[::ffff:10.0.0.1]",
        "ftp://127.0.0.1",
        "127.0.0.1:7860",
    ):
        assert not loadtest.is_loopback_url(url), url
    r = run_script("--url", "http://10.0.0.5:7860", "--duration", "1", timeout=60)
    assert r.returncode == 2 and "must be a loopback server" in r.stderr, r.stderr


def test_argument_checks() -> None:
    loadtest = load_script()
    assert loadtest.parse_mix("a1111=2,openai,gateway=0.5") == {"a1111": 2.0, "openai": 1.0, "gateway": 0.5}
    for bad in ("flux=1", "a1111=x", "a1111=0"):
        with pytest.raises(argparse.ArgumentTypeError):
            loadtest.parse_mix(bad)
    with pytest.raises(SystemExit):
        loadtest.parse_args(["--url", "http://127.0.0.1:1", "--queue-size", "4"])  # configures only its own server
    with pytest.raises(SystemExit):
        loadtest.parse_args(["--rate", "0"])
    assert loadtest.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)


def test_short_run_against_its_own_server(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    args = ["--rate", "2", "--duration", "4", "--grace", "30", "--demo-models", str(demo_root), "--json-out", str(out)]
    r = run_script(*args, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sent"] == 8 and report["dropped"] == 0
    assert report["counts"] == {"2xx": 8, "429": 0, "4xx": 0, "5xx": 0, "transport_error": 0}
    kinds = report["per_kind"]
    assert set(kinds) == {"a1111", "openai", "gateway"} and sum(k["sent"] for k in kinds.values()) == 8
    assert report["jobs"] == {"accepted": kinds["gateway"]["sent"], "completed": kinds["gateway"]["sent"]}
    assert report["lost_jobs"] == [] and report["problems"] == []
    assert report["latency_sync_2xx"]["n"] == 8 - kinds["gateway"]["sent"] and report["throughput_per_s"] > 0
    assert "PASS" in r.stdout


def test_memory_mode_against_its_own_server(demo_root: Path, tmp_path: Path) -> None:
    """--memory: the worst-case small requests at once; each is refused with its 4xx or served, none is a 5xx, and
    the server's resident memory is reported (docs/reliability.md S12 records a full run)."""
    loadtest = load_script()
    with pytest.raises(SystemExit):
        loadtest.parse_args(["--memory", "--url", "http://127.0.0.1:1"])  # whose memory? needs --server-pid
    out = tmp_path / "memory.json"
    args = ["--memory", "--copies", "1", "--demo-models", str(demo_root), "--json-out", str(out)]
    r = run_script(*args, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["answers"] == {
        "a1111_sliver_2000": {"422": 1},
        "a1111_sliver_100000": {"422": 1},
        "openai_stitch": {"400": 1},
        "a1111_largest_input": {"200": 1},
    }
    assert 0 < report["baseline_rss_mib"] <= report["peak_rss_mib"] and report["growth_mib"] < 1024
    assert report["problems"] == [] and "PASS" in r.stdout
