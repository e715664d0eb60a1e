"""Browser fixtures: Debian's Chromium driven by Playwright, and the app of
`tests.browser.harness` against this test's database, Redis prefix and processes.

Chromium is the system's (`/usr/bin/chromium`, `apt-get install chromium`; `.ci/run` installs
it), never a browser downloaded by Playwright. Without it these tests fail, not skip.
"""

import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from playwright.async_api import Browser, async_playwright

from tests.browser.harness import App, seed
from tests.e2e import conftest as e2e
from tests.e2e.harness import Processes

CHROMIUM = Path(os.environ.get("USERSTREAM_CHROMIUM", "/usr/bin/chromium"))
"""The browser binary (override with USERSTREAM_CHROMIUM)."""


processes = e2e.processes
"""The `userstream` processes fixture of tests/e2e, shared."""


@pytest.fixture
def chromium() -> Path:
    """The Chromium binary; fails the test, with how to install it, when it is missing."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's Chromium"
            " (`apt-get install -y chromium`; .ci/run installs it)",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    """A headless Chromium."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium))
        yield browser
        await browser.close()


@pytest.fixture
async def app(
    browser: Browser, processes: Processes, db: asyncpg.Connection, database_url: str
) -> AsyncIterator[App]:
    """The seeded world and a fresh browser context; no process runs yet (`App.start_relay`,
    `App.serve`). Fails at teardown if a page threw an uncaught error."""
    await seed(db)
    context = await browser.new_context()
    app = App(processes, context, database_url)
    await app.route()
    yield app
    await app.close()
    assert not app.page_errors, f"uncaught errors in the page: {app.page_errors}"
