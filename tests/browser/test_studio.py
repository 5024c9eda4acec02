"""The studio page in a real browser (headless Chromium) against a real `easel serve` on the demo models: generate
and watch, inpaint with a painted mask, browse, re-run and delete from history, and the key prompt."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.e2e.conftest import LiveServer, free_port

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

# Screenshots for the docs: EASEL_STUDIO_SCREENSHOTS=docs writes docs/studio-*.png.
SHOTS = os.environ.get("EASEL_STUDIO_SCREENSHOTS")
STEPS = "20"  # ~0.5 s at 64 px on CPU: long enough to see progress events and a live preview (every 5 steps)


def shot(page: Any, name: str) -> None:
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / f"studio-{name}.png"), full_page=True)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not [e for e in errors if "401" not in e], errors  # a refused key logs its 401; nothing else may fail


def open_studio(page: Any, url: str) -> None:
    page.goto(f"{url}/studio")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    page.wait_for_function("() => document.getElementById('status').textContent === 'Ready.'")


def fill_small(page: Any, prompt: str) -> None:
    page.select_option("#model", "demo-sd15")
    page.fill("#prompt", prompt)
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", STEPS)
    page.fill("#seed", "1234")


def record_statuses(page: Any) -> None:
    page.evaluate(
        """() => { window.statuses = [];
        new MutationObserver(() => window.statuses.push(document.getElementById('status').textContent))
          .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true});
        new MutationObserver(() => { const p = document.getElementById('preview');
          if (!p.hidden && p.src.startsWith('data:image/png')) window.sawPreview = true; })
          .observe(document.getElementById('preview'), {attributes: true}); }"""
    )


def wait_done(page: Any) -> None:
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Done')", timeout=60_000)


def result_sizes(page: Any) -> list[list[int]]:
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth)"
    )
    return page.eval_on_selector_all("#results img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")


def test_generate_watch_browse_rerun_and_delete(page: Any, live_server: LiveServer) -> None:
    open_studio(page, live_server.url)
    # The size inputs follow the model family's multiple, read from GET /v2/models.
    page.select_option("#model", "demo-flux")
    assert page.get_attribute("#width", "step") == "16"
    fill_small(page, "a studio lighthouse")
    record_statuses(page)
    page.click("#generate-button")
    wait_done(page)
    statuses = page.evaluate("window.statuses")
    assert any(s.startswith("Step ") for s in statuses), statuses  # progress over the event stream
    assert page.evaluate("window.sawPreview") is True
    assert page.is_hidden("#preview")  # the results replace the live preview
    assert page.get_attribute("#progress", "value") == "100"
    assert result_sizes(page) == [[64, 64]]
    assert "seed 1234" in page.text_content("#status")
    page.click("#seed-random")
    page.click("#seed-last")
    assert page.input_value("#seed") == "1234"
    shot(page, "generate")

    # History: the job is listed with its parameters and image; re-run gives the same picture (same seed).
    entry = page.locator("#history-list li", has_text="a studio lighthouse").first
    entry.wait_for()
    address = entry.get_attribute("data-task")
    assert "64x64" in entry.text_content() and "1234" in entry.text_content()
    entry.locator("img").first.wait_for()
    page.wait_for_function(
        f"() => {{ const i = document.querySelector('li[data-task=\"{address}\"] img'); "
        "return i && i.complete && i.naturalWidth === 64; }"
    )
    download = entry.locator("a", has_text="Download").get_attribute("href")
    assert httpx.get(download).status_code == 200  # a signed link: no credentials needed
    page.fill("#prompt", "something else")
    page.evaluate("() => { window.statuses = []; }")
    entry.get_by_role("button", name="Re-run").click()
    page.wait_for_function(
        "() => window.statuses.some(s => s.startsWith('Submitting')) "
        "&& document.getElementById('status').textContent.startsWith('Done')"
    )
    assert page.input_value("#prompt") == "a studio lighthouse"
    page.wait_for_function(  # the history reloads once the job is done
        "() => [...document.querySelectorAll('#history-list li')]"
        ".filter(li => li.textContent.includes('a studio lighthouse')).length >= 2"
    )
    shot(page, "history")

    # Delete: gone from the list, and its image link answers 404.
    page.locator(f'li[data-task="{address}"]').get_by_role("button", name="Delete").click()
    page.wait_for_selector(f'li[data-task="{address}"]', state="detached")
    assert httpx.get(download).status_code == 404
    assert httpx.get(f"{live_server.url}/v2/history/{address}").status_code == 404


def test_cancel_from_the_keyboard(page: Any, live_server: LiveServer) -> None:
    open_studio(page, live_server.url)
    fill_small(page, "a studio cancel")
    page.fill("#steps", "400")
    page.focus("#generate-button")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Step')")
    page.focus("#cancel-button")
    page.keyboard.press("Space")
    page.wait_for_function("() => document.getElementById('status').textContent === 'Cancelled.'")
    assert page.is_enabled("#generate-button") and page.is_disabled("#cancel-button")
    entry = page.locator("#history-list li", has_text="a studio cancel").first
    entry.wait_for()
    assert "cancelled" in entry.text_content()


def png_file(path: Path, color: tuple[int, int, int]) -> Path:
    Image.new("RGB", (64, 64), color).save(path)
    return path


def test_inpaint_with_a_painted_mask(page: Any, live_server: LiveServer, tmp_path: Path) -> None:
    open_studio(page, live_server.url)
    fill_small(page, "a studio inpaint")
    page.check("input[name=mode][value=img2img]")
    page.set_input_files("#init-image", str(png_file(tmp_path / "source.png", (20, 120, 220))))
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    page.fill("#brush-size", "60")
    page.dispatch_event("#brush-size", "input")
    box = page.locator("#mask").bounding_box()
    # Paint the left half of the image.
    page.mouse.move(box["x"] + 4, box["y"] + 4)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] - 4, steps=8)
    page.mouse.up()
    shot(page, "inpaint")
    requests: list[dict] = []
    page.on("request", lambda r: requests.append(r.post_data_json) if r.url.endswith("/img2img") else None)
    page.click("#generate-button")
    wait_done(page)
    assert result_sizes(page) == [[64, 64]]
    body = requests[0]
    assert body["async"] is True and body["init_images"][0].startswith("data:image/png;base64,")
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"]))).convert("L")
    assert mask.size == (64, 64)
    assert mask.getpixel((2, 2)) == 255 and mask.getpixel((62, 32)) == 0  # painted left, untouched right
    # Outside the mask the source is pasted back unchanged (A1111 inpainting with mask_blur 4 has a soft edge).
    page.wait_for_function(  # the history reloads once the job is done
        "() => (document.querySelector('#history-list li') || {textContent: ''})"
        ".textContent.includes('a studio inpaint')"
    )
    address = page.get_attribute("#history-list li", "data-task")
    item = httpx.get(f"{live_server.url}/v2/history/{address}").json()
    assert item["route"] == "img2img" and item["parameters"]["denoising_strength"] == 0.75
    result = Image.open(io.BytesIO(httpx.get(item["images"][0]["url"]).content)).convert("RGB")
    assert result.getpixel((62, 32)) == (20, 120, 220)


@pytest.fixture(scope="module")
def keyed_server(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A second `easel serve` with an API key (its own data directory; the demo models linked from the session's)."""
    from server.access.keys import KeyStore
    from server.jobs.db import create_tables, make_engine

    data = tmp_path_factory.mktemp("keyed-data")
    (data / "demo-models").symlink_to(live_server.data_dir / "demo-models")
    engine = make_engine(f"sqlite:///{data / 'easel.db'}")
    create_tables(engine)
    secret = KeyStore(engine).create("studio").secret
    engine.dispose()
    port = free_port()
    log = data / "easel.log"
    easel = Path(sys.executable).parent / "easel"
    args = [str(easel), "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data)]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        yield url, secret
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def test_with_keys_the_page_asks_for_one_and_says_when_it_is_wrong(page: Any, keyed_server: tuple[str, str]) -> None:
    url, secret = keyed_server
    assert httpx.get(f"{url}/studio").status_code == 200  # the page itself is public
    assert httpx.get(f"{url}/v2/models").status_code == 401  # its data is not
    page.goto(f"{url}/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    assert page.evaluate("document.activeElement.id") == "key-input"
    page.fill("#key-input", "sk-wrong")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('key-error').textContent.includes('refused')")
    assert dialog.is_visible()
    page.fill("#key-input", secret)
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('status').textContent === 'Ready.'")
    assert not dialog.is_visible()
    assert page.evaluate("sessionStorage.getItem('easel.studio.key')") == secret
    # Every data call carried the key as a header; none put it in a URL.
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.reload()
    page.wait_for_function("() => document.getElementById('status').textContent === 'Ready.'")
    assert urls and not [u for u in urls if secret in u]
