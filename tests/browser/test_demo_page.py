"""The `/demo` page of `userstream demo` streams through the browser client it loads from
the gateway (`/client/userstream.js`): pick a user, the page goes live and lists changes; pick
another, it switches."""

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser

from tests.services import free_port


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    """`userstream demo` on the embedded default (no DATABASE_URL, no REDIS_URL); its URL."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env |= {"USERSTREAM_DATA_DIR": str(tmp_path / "data"), "USERSTREAM_LOG_LEVEL": "warning"}
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "demo", "--port", str(port), "--rate", "10"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    try:
        for line in process.stdout:  # ends if the demo dies
            if "demo is live" in line:
                break
        else:
            raise AssertionError("the demo did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


async def test_the_demo_page_streams_changes_through_the_client(
    browser: Browser, demo: str
) -> None:
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    modules: list[str] = []
    page.on("request", lambda request: modules.append(request.url))
    await page.goto(f"{demo}/demo")
    await page.wait_for_selector("#users button")
    assert f"{demo}/client/userstream.js" in modules

    await page.click("#users button:nth-child(1)")
    await page.wait_for_function("document.getElementById('state').textContent === 'open'")
    await page.wait_for_function("Number(document.getElementById('n').textContent) >= 3")
    cursors = await page.eval_on_selector_all(
        "#rows tr", "rows => rows.map(r => r.cells[5].textContent)"
    )
    assert cursors == sorted(cursors, reverse=True)  # newest first, each once
    assert len(set(cursors)) == len(cursors)

    await page.click("#users button:nth-child(2)")
    await page.wait_for_function("document.getElementById('state').textContent === 'open'")
    await page.wait_for_function("Number(document.getElementById('n').textContent) >= 1")
    assert "live from cursor" in (await page.text_content("#status") or "")
    assert errors == []
