"""A page reload resumes from the last applied cursor, kept in localStorage (PROTOCOL.md §6):
no second prefetch, and every change after the stored cursor applied exactly once, while
changes are being committed through the reload."""

import asyncio

import asyncpg

from tests.browser.harness import App, all_messages, assert_exactly_once, without


async def test_a_reload_during_publishing_resumes_from_the_stored_cursor(
    app: App, db: asyncpg.Connection
) -> None:
    app.start_relay()
    await app.serve()
    publisher = app.publisher()
    prefetched = await publisher.commit(3)
    tab = await app.open("reloaded")
    await tab.live()
    publisher.start()
    await tab.wait("window.load.applied.length >= 5", None, 15, "five changes")
    await tab.page.reload()
    await tab.live()
    await asyncio.sleep(0.5)
    last = await publisher.stop()
    await tab.has_applied(last)

    before, after = await tab.loads()
    assert [b["ids"] for b in before["bootstraps"]] == [prefetched]
    assert after["bootstraps"] == [], "the reloaded page prefetched instead of resuming"
    assert before["applied"] and after["applied"]
    expected = without(await all_messages(db), prefetched)
    assert_exactly_once(before["applied"] + after["applied"], expected)
