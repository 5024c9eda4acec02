"""Log lines name their request and job (text and JSON formats), and `EASEL_LOG_FORMAT=json` / `--log-format` pick
the JSON one for `easel` (issue #17)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator

import pytest

from pipelines import log_context
from server.cli import _log_format
from server.logs import configure_logging
from server.request_id import accept_or_make


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def emit(message: str, *, exc: bool = False) -> None:
    log = logging.getLogger("easel.test")
    if exc:
        try:
            raise ValueError("bad value")
        except ValueError:
            log.exception(message)
    else:
        log.info(message)


def test_json_format_is_one_object_per_line_with_request_and_job(capsys, restore_root_logging) -> None:
    configure_logging("info", "json")
    with log_context.bound("req-1", "job-1"):
        emit("inside")
        with log_context.bound(job="job-2"):
            emit("nested\nmessage with a line break", exc=True)
    emit("outside")
    lines = capsys.readouterr().err.splitlines()
    entries = [json.loads(line) for line in lines]  # every line parses: line breaks are escaped
    assert len(entries) == 3
    inside, nested, outside = entries
    assert inside["message"] == "inside" and inside["level"] == "INFO" and inside["logger"] == "easel.test"
    assert (inside["request_id"], inside["job_id"]) == ("req-1", "job-1")
    assert inside["time"].endswith("+00:00") and "exc_info" not in inside
    assert (nested["request_id"], nested["job_id"]) == ("req-1", "job-2")
    assert nested["level"] == "ERROR" and "ValueError: bad value" in nested["exc_info"]
    assert "request_id" not in outside and "job_id" not in outside


def test_text_format_names_request_and_job(capsys, restore_root_logging) -> None:
    configure_logging("info", "text")
    with log_context.bound("req-9"):
        emit("hello")
    emit("bye")
    hello, bye = capsys.readouterr().err.splitlines()
    assert hello.endswith("INFO easel.test: hello [request_id=req-9]")
    assert bye.endswith("INFO easel.test: bye")


def test_log_format_comes_from_the_flag_or_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("EASEL_LOG_FORMAT", raising=False)
    assert _log_format(argparse.Namespace()) == "text"
    monkeypatch.setenv("EASEL_LOG_FORMAT", "json")
    assert _log_format(argparse.Namespace()) == "json"
    assert _log_format(argparse.Namespace(log_format="text")) == "text"
    monkeypatch.setenv("EASEL_LOG_FORMAT", "xml")  # invalid: the command reports it; logging stays text
    assert _log_format(argparse.Namespace()) == "text"


@pytest.mark.parametrize("given", ["abc", "0f" * 16, "trace:1/2;x=y", "x" * 128])
def test_sane_request_ids_are_kept(given: str) -> None:
    assert accept_or_make(given) == given


@pytest.mark.parametrize("given", [None, "", "a b", "x" * 129, "line\nbreak", "nul\x00", "ü"])
def test_other_request_ids_are_replaced(given: str | None) -> None:
    made = accept_or_make(given)
    assert made != given and len(made) == 32 and int(made, 16) >= 0


@pytest.mark.parametrize(
    ("logger", "message"),
    [
        ("transformers.utils.import_utils", "CLIPImageProcessor requires torchvision (not installed); falling back to"),
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: no kernels"),
    ],
)
def test_expected_library_warnings_go_to_debug(caplog, logger: str, message: str) -> None:
    from pipelines.library_logging import install_filters

    install_filters()
    with caplog.at_level(logging.DEBUG):
        logging.getLogger(logger).warning(message)
        logging.getLogger(logger).warning("something else went wrong")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["something else went wrong"]
    assert any(message in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
