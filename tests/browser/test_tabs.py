"""Tabs of one user share one `/me/stream` connection (PROTOCOL.md §6): the leader tab holds
it, the follower applies the changes the leader receives, and when the leader tab closes the
follower takes over without losing or repeating a change.

In wal ingest mode a prefetch cursor carries the prefetch's snapshot, and a tab streams on its
own connection from such a cursor until it has applied a change of a transaction the snapshot
could not know (README "Browser client"): the tabs share one connection from the first change
committed after their prefetches."""

import asyncio

import asyncpg

from tests.browser.harness import App, all_messages, assert_exactly_once
from tests.e2e.harness import eventually


async def test_two_tabs_hold_one_connection_and_the_follower_takes_over(
    app: App, db: asyncpg.Connection
) -> None:
    app.start_relay()
    await app.serve()
    first = await app.open("first")
    await first.live()
    second = await app.open("second")
    await second.live()
    publisher = app.publisher()
    (opening,) = await publisher.commit()  # after both prefetches: their snapshots' watch ends
    await first.has_applied(opening)
    await second.has_applied(opening)

    async def one_connection() -> bool:
        return await app.connections() == 1

    await eventually(one_connection, "one open stream")
    assert sorted([await first.role(), await second.role()]) == ["follower", "leader"]
    publisher.start()
    samples = []
    for _ in range(8):  # while both tabs apply changes
        samples.append(await app.connections())
        await asyncio.sleep(0.1)
    assert samples == [1.0] * len(samples), samples

    leader, follower = (first, second) if await first.role() == "leader" else (second, first)
    await leader.page.close()  # while publishing goes on
    await follower.wait("window.stream.role === 'leader'", None, 10, "the follower to lead")
    await asyncio.sleep(0.5)
    last = await publisher.stop()
    await follower.has_applied(last)
    await eventually(one_connection, "one open stream after the switch")

    expected = await all_messages(db)  # none existed when the tabs prefetched
    for name in ("first", "second"):
        for load in await follower.recorded(name):
            assert [b["ids"] for b in load["bootstraps"]] in ([], [[]]), name
    assert_exactly_once((await follower.load())["applied"], expected)
    (closed,) = await follower.recorded(leader.name)
    assert len(closed["applied"]) > 0, "the leader tab applied nothing before it closed"
    assert_exactly_once(closed["applied"], expected[: len(closed["applied"])])
