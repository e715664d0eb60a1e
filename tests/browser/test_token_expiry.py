"""A stream whose token expires ends with `event: close` `token_expired` (PROTOCOL.md §3); the
client asks `token()` for a new one and reconnects at once from its last cursor (PROTOCOL.md
§6), with no gap and no duplicate while changes keep coming. Early renewal is off
(`refreshBeforeExpS: 0`), so every renewal here is the gateway's close."""

import asyncio

import asyncpg

from tests.browser.harness import App, all_messages, assert_exactly_once, without


async def test_an_expired_token_is_renewed_without_a_gap(app: App, db: asyncpg.Connection) -> None:
    app.start_relay()
    await app.serve(USERSTREAM_JWT_LEEWAY_S="0")
    app.tokens.ttl_s = 2
    publisher = app.publisher()
    tab = await app.open(refreshBeforeExpS=0)
    await tab.live()
    publisher.start()
    await asyncio.sleep(5)
    last = await publisher.stop()
    await tab.has_applied(last)

    expired = await app.metric("userstream_disconnects_total", reason="token_expired")
    assert expired >= 2, expired
    load = await tab.load()
    assert load["tokens"] >= expired + 1, (load["tokens"], expired)
    (bootstrap,) = load["bootstraps"]
    assert load["resets"] == []
    assert_exactly_once(load["applied"], without(await all_messages(db), bootstrap["ids"]))
