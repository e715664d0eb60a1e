"""The `auth-storm` benchmark scenario end to end at a tiny size, and its stand-in core API.

The scenario starts a real gateway per authenticator (HS256, RS256 key, JWKS, forward auth) and
storms it with the C load client `sseload` (built here): every connection of every variant must
become ready, and forward auth must ask the stand-in core API once per connect cold and never
warm (the gateway's cache answers). The stand-in's `/check` is checked on its own: a valid
session as bearer token or cookie is admitted, anything else refused.
"""

import asyncio
import dataclasses
import os
import shutil

import httpx
import pytest

from bench import auth, loadclient
from bench.auth_upstream import AuthUpstream, session_for
from bench.scenarios import QUICK, Context
from bench.suite import target_factory
from tests.services import INGEST, PgServer

CPUS = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
CONNECTIONS = 30

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


@needs_cc
@pytest.mark.timeout(90)
async def test_every_variant_connects_and_warm_forward_auth_asks_nobody(
    pg_server: PgServer, redis_url: str
) -> None:
    await asyncio.to_thread(loadclient.build)
    sizes = dataclasses.replace(
        QUICK,
        storm_connections=CONNECTIONS,
        storm_concurrency=10,
        storm_rounds=1,
        presence_grace_s=0.5,
        presence_interval_s=0.5,
        quiet_s=2.0,
    )
    ctx = Context(
        sizes=sizes,
        server_cpu=CPUS,
        client_cpu=CPUS,
        targets=["userstream"],
        make_target=target_factory(pg_server, redis_url, CPUS, ingest=INGEST),
        idle_connections=(),
    )
    report = await auth.auth_storm(ctx)

    errors = [row for row in report.rows if "error" in row]
    assert errors == []
    by_variant = {row["variant"]: row for row in report.rows}
    assert list(by_variant) == list(auth.VARIANTS)
    for variant, row in by_variant.items():
        assert (row["connections"], row["ready"], row["failed"]) == (CONNECTIONS, CONNECTIONS, 0), (
            variant
        )
    assert by_variant["forward-cold"]["upstream_calls_per_conn"] == 1
    assert by_variant["forward-warm"]["upstream_calls_per_conn"] == 0
    assert by_variant["jwks-rs256"]["jwks_fetches"] == 1  # at start-up, none during the storm
    assert by_variant["jwt-rs256"]["jwks_fetches"] == 0
    assert report.summary["warm_upstream_calls_per_conn"]["within_goal"] is True
    assert set(report.summary["ratios"]) == {
        "forward-cold/jwt-hs256",
        "forward-warm/jwt-hs256",
        "jwks-rs256/jwt-rs256",
    }


@pytest.mark.timeout(30)
async def test_upstream_check_admits_valid_sessions_only() -> None:
    async with (
        AuthUpstream("check-secret", jwks={"keys": []}, delay_ms=0) as upstream,
        httpx.AsyncClient(timeout=5) as client,
    ):
        session = upstream.session("u7")
        bearer = await client.get(
            upstream.check_url, headers={"Authorization": f"Bearer {session}"}
        )
        cookie = await client.get(upstream.check_url, headers={"Cookie": f"a=1; session={session}"})
        forged = await client.get(upstream.check_url, headers={"Authorization": "Bearer u7.00ff"})
        other_secret = session_for("another-secret", "u7")
        foreign = await client.get(
            upstream.check_url, headers={"Cookie": f"session={other_secret}"}
        )
        missing = await client.get(upstream.check_url)
        jwks = await client.get(upstream.jwks_url)
        stats = await upstream.stats()

    for answer in (bearer, cookie):
        assert answer.status_code == 200
        body = answer.json()
        assert (body["userId"], body["admin"]) == ("u7", False)
        assert body["expiresAt"] > 0
    assert [a.status_code for a in (forged, foreign, missing)] == [401, 401, 401]
    assert jwks.json() == {"keys": []}
    assert stats == {"check": 5, "jwks": 1}
