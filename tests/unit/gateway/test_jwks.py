"""Keys from a JWKS URL (gateway.jwks, gateway.auth.JwksAuthenticator) against a real local
HTTP server: selection by `kid`, rotation, the unknown-`kid` refresh limit, one fetch for
concurrent callers, keys kept through an outage, readiness."""

import asyncio
import time
from collections.abc import Iterator

import jwt
import pytest

from gateway.auth import AuthError, JwksAuthenticator
from gateway.settings import Settings
from tests.identity_server import IdentityServer, SigningKey

MIN_REFRESH_S = 0.3


@pytest.fixture
def server() -> Iterator[IdentityServer]:
    running = IdentityServer([SigningKey.generate("k1", "RS256")]).start()
    yield running
    running.stop()


def authenticator(server: IdentityServer, **overrides: object) -> JwksAuthenticator:
    settings = Settings.model_validate(
        {
            "jwt_jwks_url": server.url,
            "jwks_min_refresh_s": MIN_REFRESH_S,
            "jwks_timeout_s": 2,
            **overrides,
        }
    )
    return JwksAuthenticator(settings)


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
async def test_each_algorithm_verifies_by_kid(algorithm: str) -> None:
    key = SigningKey.generate(f"{algorithm}-key", algorithm)
    other = SigningKey.generate("other", "RS256")
    server = IdentityServer([other, key]).start()
    try:
        auth = authenticator(server)
        await auth.start()
        principal = await auth.verify(key.sign("alice", ttl_s=60, system_role="admin"))
        assert principal.user_id == "alice" and principal.admin
        assert principal.expires_at == pytest.approx(time.time() + 60, abs=5)
        assert (await auth.verify(other.sign("bob"))).user_id == "bob"
        assert server.jwks_requests == 1
    finally:
        server.stop()


async def test_bad_tokens_are_refused(server: IdentityServer) -> None:
    auth = authenticator(server, jwt_audience="app")
    await auth.start()
    key = server.keys[0]
    with pytest.raises(AuthError, match="token expired"):
        await auth.verify(key.sign("alice", ttl_s=-60, aud="app"))
    forged = SigningKey.generate("k1", "RS256")  # same kid, another private key
    with pytest.raises(AuthError, match="Signature verification failed"):
        await auth.verify(forged.sign("alice", aud="app"))
    with pytest.raises(AuthError, match="Audience"):
        await auth.verify(key.sign("alice", aud="other"))
    # an HS256 token naming an RSA key's kid: the key's algorithm decides, not the header
    confused = jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 60, "aud": "app"},
        "a-secret-that-is-long-enough-for-hs256",
        algorithm="HS256",
        headers={"kid": "k1"},
    )
    with pytest.raises(AuthError, match="invalid token"):
        await auth.verify(confused)
    no_kid = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, key.private, "RS256")
    with pytest.raises(AuthError, match="no kid"):
        await auth.verify(no_kid)
    with pytest.raises(AuthError, match="invalid token"):
        await auth.verify("not-a-jwt")
    assert (await auth.verify(key.sign("alice", aud="app"))).user_id == "alice"


async def test_rotation_is_picked_up_on_the_new_kid(server: IdentityServer) -> None:
    auth = authenticator(server)
    await auth.start()
    old = server.keys[0]
    new = SigningKey.generate("k2", "ES256")
    server.keys = [new]
    await asyncio.sleep(MIN_REFRESH_S)
    assert (await auth.verify(new.sign("alice"))).user_id == "alice"
    assert server.jwks_requests == 2
    # the provider removed the old key: it no longer verifies (and the limit holds)
    with pytest.raises(AuthError, match="no signing key"):
        await auth.verify(old.sign("alice"))
    assert server.jwks_requests == 2


async def test_unknown_kids_refresh_at_most_once_per_interval(server: IdentityServer) -> None:
    auth = authenticator(server)
    await auth.start()
    key = server.keys[0]
    await asyncio.sleep(MIN_REFRESH_S)
    for attempt in range(20):
        with pytest.raises(AuthError, match="no signing key"):
            await auth.verify(key.sign("alice", kid=f"unknown-{attempt}"))
    assert server.jwks_requests == 2  # the first load and one refresh
    await asyncio.sleep(MIN_REFRESH_S)
    with pytest.raises(AuthError, match="no signing key"):
        await auth.verify(key.sign("alice", kid="unknown-late"))
    assert server.jwks_requests == 3
    assert (await auth.verify(key.sign("alice"))).user_id == "alice"
    assert server.jwks_requests == 3  # a known kid never fetches


async def test_concurrent_unknown_kids_share_one_fetch(server: IdentityServer) -> None:
    auth = authenticator(server)
    await auth.start()
    new = SigningKey.generate("k2", "EdDSA")
    server.keys = [server.keys[0], new]
    server.delay_s = 0.3  # every caller arrives while the one fetch is under way
    await asyncio.sleep(MIN_REFRESH_S)
    tokens = [new.sign(f"user-{n}") for n in range(50)]
    principals = await asyncio.gather(*(auth.verify(t) for t in tokens))
    assert [p.user_id for p in principals] == [f"user-{n}" for n in range(50)]
    assert server.jwks_requests == 2


async def test_outage_keeps_known_keys_and_readiness(server: IdentityServer) -> None:
    auth = authenticator(server)
    await auth.start()
    key = server.keys[0]
    server.failing = True
    await asyncio.sleep(MIN_REFRESH_S)
    assert not await auth.keys.refresh()
    assert (await auth.verify(key.sign("alice"))).user_id == "alice"
    server.stop()
    await asyncio.sleep(MIN_REFRESH_S)
    assert not await auth.keys.refresh()
    assert (await auth.verify(key.sign("alice"))).user_id == "alice"
    ready, report = auth.readiness()
    assert ready and report is not None
    assert report["jwks"] == "refresh failing, known keys kept"
    assert report["kids"] == ["k1"] and "Connection refused" in str(report["last_error"])


async def test_never_loaded_is_not_ready_until_the_first_fetch(server: IdentityServer) -> None:
    server.stop()
    auth = authenticator(server)
    await auth.start()
    ready, report = auth.readiness()
    assert not ready and report is not None and report["jwks"] == "never loaded"
    key = server.keys[0]
    with pytest.raises(AuthError, match="no signing key"):
        await auth.verify(key.sign("alice"))  # within the interval: no second fetch
    assert auth.keys.fetches == 1
    server.start()
    stop = asyncio.Event()
    runner = asyncio.create_task(auth.run(stop))  # retries every min_refresh_s until loaded
    try:
        deadline = time.monotonic() + 5
        while not auth.readiness()[0]:
            assert time.monotonic() < deadline, "the JWKS was never loaded"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await runner
    assert (await auth.verify(key.sign("alice"))).user_id == "alice"
    assert auth.readiness()[1] == {
        "jwks": "ok",
        "kids": ["k1"],
        "loaded_at": auth.keys.loaded_at,
        "last_error": None,
    }


async def test_periodic_refresh_follows_rotation(server: IdentityServer) -> None:
    auth = authenticator(server, jwks_refresh_s=MIN_REFRESH_S)
    await auth.start()
    server.keys = [SigningKey.generate("k2", "RS256")]
    stop = asyncio.Event()
    runner = asyncio.create_task(auth.run(stop))
    try:
        deadline = time.monotonic() + 5
        while auth.keys.kids() != ["k2"]:
            assert time.monotonic() < deadline, "the rotation was never fetched"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await runner
