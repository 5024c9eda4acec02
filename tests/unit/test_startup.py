"""`easel serve` start-up failures: one line saying what is wrong and what to do, a non-zero exit, no traceback (unless
--log-level debug). Each case runs the real command; it stops before any model is loaded."""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from server import preflight
from server.access.config import AccessSettingError, check_access_settings
from server.app import create_app
from server.preflight import StartupProblem
from server.settings import Settings
from tests.conftest import free_port

EASEL = Path(sys.executable).parent / "easel"


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [str(EASEL), "serve", "--host", "127.0.0.1", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_a_port_in_use_says_how_to_choose_another(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--port", str(port), "--data-dir", str(tmp_path))
    assert_one_line(result, f"port {port}", "already in use", "--port", "EASEL_PORT")


def test_a_data_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    result = serve("--port", str(free_port()), "--data-dir", str(tmp_path / "data"))
    assert_one_line(result, "is a file", "--data-dir")


def test_a_job_database_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "easel.db").write_bytes(b"these are not the bytes of a SQLite database" * 100)
    result = serve("--port", str(free_port()), "--data-dir", str(tmp_path))
    assert_one_line(result, "easel.db", "not a usable SQLite database", "EASEL_DATABASE_URL")


def test_a_job_database_that_fails_the_quick_check(tmp_path: Path) -> None:
    db = tmp_path / "easel.db"
    connection = sqlite3.connect(db)
    connection.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, body TEXT)")
    connection.executemany("INSERT INTO jobs (body) VALUES (?)", [("x" * 500,) for _ in range(200)])
    connection.commit()
    connection.close()
    raw = bytearray(db.read_bytes())
    page = 4096
    assert len(raw) > 4 * page
    raw[3 * page : 3 * page + 64] = b"\xff" * 64  # a b-tree page header (its type byte and cell counts) trampled
    db.write_bytes(bytes(raw))
    result = serve("--port", str(free_port()), "--data-dir", str(tmp_path))
    line = assert_one_line(result, "easel.db")
    assert "damaged" in line or "not a usable" in line


def test_a_bad_models_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  x: [\n")
    result = serve("--port", str(free_port()), "--data-dir", str(tmp_path), "--models", str(bad))
    assert_one_line(result, str(bad), "line 3")


def test_log_level_debug_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    result = serve("--port", str(free_port()), "--data-dir", str(tmp_path / "data"), "--log-level", "debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "is a file" in result.stderr


def test_a_read_only_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o500)
    try:
        if os.geteuid() == 0:  # root writes anywhere: give the write probe what a read-only mount answers

            def read_only(*args: object, **kwargs: object) -> None:
                raise OSError(errno.EROFS, "Read-only file system")

            monkeypatch.setattr(preflight.tempfile, "NamedTemporaryFile", read_only)
        with pytest.raises(StartupProblem, match=r"cannot write to the data directory .* \(read-only\).*--data-dir"):
            preflight.check_data_dir(data)
    finally:
        data.chmod(0o700)


def test_a_healthy_start_passes_every_check(tmp_path: Path) -> None:
    db = tmp_path / "easel.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    preflight.check_data_dir(tmp_path / "new" / "data")
    preflight.check_job_database(f"sqlite:///{db}")
    preflight.check_job_database("postgresql+psycopg://easel@db/easel")  # not ours to open here
    preflight.check_port("127.0.0.1", free_port())
    assert preflight.sqlite_path(f"sqlite:///{db}") == db


# Access settings fail closed (issue #14): a value that names no usable user stops the server, never opens it.

MALFORMED_AUTH = {
    "": "empty",
    "   ": "empty",
    "garbage": "no ':'",
    ":nopass": "empty user name",
    "user:": "empty password",
    "ann:pw,": "entry 2 is empty",
    "ann:pw,,ben:pw2": "entry 2 is empty",
    "ann:pw,ann:other": "listed twice",
}


def test_a_malformed_api_auth_stops_start_up_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EASEL_API_AUTH": "garbage"}
    result = subprocess.run(
        [str(EASEL), "serve", "--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert_one_line(result, "EASEL_API_AUTH", "no ':'", "user:password")
    assert result.returncode == 2


@pytest.mark.parametrize("value", list(MALFORMED_AUTH))
def test_every_malformed_api_auth_is_refused_without_echoing_it(value: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, host="0.0.0.0", api_auth=value)
    with pytest.raises(StartupProblem, match="EASEL_API_AUTH") as refused:
        preflight.check_access(settings)
    assert MALFORMED_AUTH[value] in str(refused.value)
    assert "nopass" not in str(refused.value) and "other" not in str(refused.value)  # passwords are not repeated
    # An app built some other way (Ray ingress, tests) fails closed too: no app without its authentication.
    with pytest.raises(AccessSettingError):
        create_app(settings, engine=object(), registry=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"api_auth_admins": ["ann"]}, "EASEL_API_AUTH has no users"),
        ({"api_auth": "ben:pw", "api_auth_admins": "ann,ben"}, "not in EASEL_API_AUTH: ann"),
        ({"webhook_secret": "short"}, "EASEL_WEBHOOK_SECRET"),
        ({"cors_allow_origins": ["*"], "cors_allow_credentials": True}, "EASEL_CORS_ALLOW_CREDENTIALS"),
    ],
)
def test_other_malformed_access_settings_stop_start_up(overrides: dict, words: str, tmp_path: Path) -> None:
    with pytest.raises(StartupProblem, match=words):
        preflight.check_access(Settings(data_dir=tmp_path, **overrides))


def test_well_formed_access_settings_pass(tmp_path: Path) -> None:
    users = check_access_settings(Settings(data_dir=tmp_path, api_auth="ann:p:w, ben:pw2", api_auth_admins="ben"))
    assert users.passwords == {"ann": "p:w", "ben": "pw2"} and users.admins == {"ben"}
    preflight.check_access(Settings(data_dir=tmp_path))  # nothing set: API keys only
