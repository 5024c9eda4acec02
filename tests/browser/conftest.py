"""Headless Chromium for the studio page tests: the system's Chromium (a distribution package, e.g. Debian's
`chromium`), driven by Playwright. No browser is downloaded: without a Chromium (or without the `playwright`
package) every test here is skipped, saying why."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import live_server  # noqa: F401  (the session's real `easel serve`)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")


def find_chromium() -> str | None:
    """EASEL_CHROMIUM, else the first Chromium on the PATH."""
    configured = os.environ.get("EASEL_CHROMIUM")
    if configured:
        return configured if os.path.exists(configured) else None
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


# Module scope, not session: while sync_playwright runs, its event loop counts as running in the main thread, and
# every later test that calls asyncio.run() (or Ray's sync handles) would fail.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the `playwright` package is not installed (pip install -e '.[dev]')")
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set EASEL_CHROMIUM to its path)")
    with sync_playwright() as p:
        # No sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()
