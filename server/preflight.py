"""What would stop `easel serve` a moment after it started, found before it starts: each problem is one sentence that
says what is wrong and what to do, so the command can print one line and exit non-zero instead of a traceback."""

from __future__ import annotations

import errno
import socket
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import unquote

from server.settings import Settings


class StartupProblem(Exception):
    """A start-up failure a person can fix; its message is the whole explanation."""


def check_data_dir(data_dir: Path) -> None:
    """The data directory exists (made if missing) and this process can write into it."""
    if data_dir.exists() and not data_dir.is_dir():
        raise StartupProblem(
            f"the data directory {data_dir} is a file, not a directory: move it away or choose another with "
            "--data-dir (EASEL_DATA_DIR)"
        )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".easel-write-check-"):
            pass
    except OSError as e:
        why = "read-only" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else (e.strerror or str(e))
        raise StartupProblem(
            f"cannot write to the data directory {data_dir} ({why}): make it writable for this user, or choose "
            "another with --data-dir (EASEL_DATA_DIR)"
        ) from e


def sqlite_path(database_url: str) -> Path | None:
    """The file of a `sqlite:///` URL; None for other databases and in-memory SQLite."""
    prefix = "sqlite:///"
    if not database_url.startswith(prefix):
        return None
    path = unquote(database_url[len(prefix) :].split("?", 1)[0])
    return Path(path) if path and path != ":memory:" else None


def check_job_database(database_url: str) -> None:
    """An existing SQLite job database opens and passes SQLite's quick check (a new one is created later)."""
    path = sqlite_path(database_url)
    if path is None or not path.exists():
        return
    advice = "move it away (a new one is created at start) or point EASEL_DATABASE_URL at the right file"
    if path.is_dir():
        raise StartupProblem(f"the job database {path} is a directory: {advice}")
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            rows = connection.execute("PRAGMA quick_check").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError as e:
        raise StartupProblem(f"the job database {path} is not a usable SQLite database ({e}): {advice}") from e
    result = "; ".join(str(r[0]) for r in rows[:3])
    if result != "ok":
        raise StartupProblem(f"the job database {path} is damaged (SQLite quick check: {result}): {advice}")


def check_port(host: str, port: int) -> None:
    """Nothing listens on host:port yet (uvicorn binds it a moment later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        probe.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise StartupProblem(
                f"port {port} on {host} is already in use (another easel or program is listening there): stop it, "
                f"or choose another port with --port N (or EASEL_PORT=N)"
            ) from e
        if e.errno == errno.EACCES:
            raise StartupProblem(
                f"no permission to listen on port {port}: ports below 1024 need privileges; choose another with "
                "--port N (or EASEL_PORT=N)"
            ) from e
        if e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
            raise StartupProblem(
                f"cannot listen on {host}: no such address on this machine; use --host 127.0.0.1, 0.0.0.0 or one of "
                "this machine's addresses (EASEL_HOST)"
            ) from e
        raise
    finally:
        probe.close()


def check_access(settings: Settings) -> None:
    """Auth and access settings are well-formed: a malformed one must stop the server, never open it."""
    from server.access.config import AccessSettingError, check_access_settings

    try:
        check_access_settings(settings)
    except AccessSettingError as e:
        raise StartupProblem(str(e)) from None


def check_startup(settings: Settings) -> None:
    """Every check `easel serve` runs before it builds the app; raises the first StartupProblem."""
    check_access(settings)
    check_data_dir(settings.data_dir)
    check_job_database(settings.resolved_database_url)
    check_port(settings.host, settings.port)
