"""`must-refetch` in the browser (PROTOCOL.md §3, §6): a page resuming from a stored cursor
older than the retained history prefetches again, hands the new data to `onReset`, and goes
on from the new cursor without losing a change committed meanwhile.

As in tests/e2e/test_must_refetch.py: the relay prunes with a one-hour retention, the
messages after the stored cursor are made two days old so that it prunes them, and a new
gateway (on the same address, so the page keeps its origin and storage) starts with a
recent-event window that does not hold them.
"""

import asyncio

import asyncpg

from tests.browser.harness import (
    App,
    all_messages,
    assert_exactly_once,
    wait_for_positions,
    wait_for_pruning,
    without,
)

RETENTION = {"USERSTREAM_RETENTION_S": "3600", "USERSTREAM_PRUNE_INTERVAL_S": "0.2"}


async def test_must_refetch_prefetches_again_and_loses_nothing(
    app: App, db: asyncpg.Connection
) -> None:
    app.start_relay(**RETENTION)
    await app.serve()
    publisher = app.publisher()
    tab = await app.open("refetched")
    await tab.live()
    (first,) = await publisher.commit()
    await tab.has_applied(first)  # the stored cursor is now this change's
    await tab.page.close()

    pruned = await publisher.commit(4)
    await wait_for_positions(db)
    await db.execute(
        "UPDATE outbox SET committed_at = committed_at - interval '2 days'"
        " WHERE entity_id = ANY($1::text[])",
        [first, *pruned[:-1]],
    )
    through = await db.fetchval("SELECT seq FROM outbox WHERE entity_id = $1", pruned[-2])
    await wait_for_pruning(db, through)
    await app.stop_gateway()
    await app.serve()

    publisher.start()
    await asyncio.sleep(0.2)
    tab = await app.open("refetched")
    await tab.wait("window.load.resets.length === 1", None, 15, "onReset")
    await tab.live()
    await asyncio.sleep(0.5)
    last = await publisher.stop()
    await tab.has_applied(last)

    before, after = await tab.loads()
    assert [b["ids"] for b in before["bootstraps"]] == [[]]
    assert before["applied"] == [first]
    statuses = [status for status, _ in after["statuses"]]
    assert "refetching" in statuses, statuses
    (refetch,) = after["bootstraps"]  # none at start: the page resumed from its cursor
    (reset,) = after["resets"]
    assert reset["ids"] == refetch["ids"]
    assert reset["ids"][:5] == [first, *pruned]  # the app's data, which retention never prunes
    expected = without(await all_messages(db), reset["ids"])
    assert expected, "nothing was committed after the refetch"
    assert reset["after"] == 0, "a change was applied before the reset"
    held = set(reset["ids"])
    again = [
        (entity_id, cursor)
        for entity_id, cursor in zip(after["applied"], after["cursors"], strict=True)
        if entity_id in held
    ]
    assert not again, f"applied though the prefetch at {refetch['cursor']} held them: {again}"
    assert_exactly_once(after["applied"], expected)
