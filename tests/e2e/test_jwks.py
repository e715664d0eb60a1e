"""Keys from an identity provider's JWKS (USERSTREAM_JWT_JWKS_URL) with a real gateway process
and a local JWKS server: RS256, ES256 and EdDSA by `kid`; rotation without a restart; an
unknown `kid` refreshes at most once per interval; bad tokens get 401; a provider that is down
does not refuse known keys through many failed refreshes, and a key rotated meanwhile is
picked up when it is back; `/readyz` waits for the first load."""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import Gateway, Processes, StreamClient, eventually
from tests.identity_server import IdentityServer, SigningKey

MIN_REFRESH_S = 1.0
OUTAGE_S = 5.0


@pytest.fixture
def provider() -> Iterator[IdentityServer]:
    server = IdentityServer(
        [
            SigningKey.generate("rsa-1", "RS256"),
            SigningKey.generate("ec-1", "ES256"),
            SigningKey.generate("ed-1", "EdDSA"),
        ]
    )
    yield server
    server.stop()


def start_gateway(
    processes: Processes, provider: IdentityServer, log_file: Path | None = None, **env: str
) -> Gateway:
    return processes.gateway(
        "--with-relay",
        env={
            "USERSTREAM_JWT_SECRET": "",
            "USERSTREAM_JWT_JWKS_URL": provider.url,
            "USERSTREAM_JWKS_MIN_REFRESH_S": str(MIN_REFRESH_S),
            "USERSTREAM_JWKS_TIMEOUT_S": "2",
            **env,
        },
        log_file=log_file,
    )


async def opens(gateway: Gateway, token: str) -> bool:
    """True when `token` opens a stream (its `offset` event arrives)."""
    client = StreamClient(gateway.url, {"Authorization": f"Bearer {token}"})
    try:
        await client.connect()
    finally:
        await client.close()
    return client.status == 200


async def refused(client: httpx.AsyncClient, gateway: Gateway, token: str, detail: str) -> None:
    response = await client.get(
        f"{gateway.url}/me/stream", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert detail in response.json()["detail"]


async def test_keys_by_kid_rotation_and_unknown_kid_limit(
    processes: Processes, provider: IdentityServer
) -> None:
    provider.start()
    gateway = start_gateway(processes, provider)
    async with httpx.AsyncClient(timeout=10) as client:
        ready = await client.get(f"{gateway.url}/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["auth"]["kids"] == ["ec-1", "ed-1", "rsa-1"]
        for key in provider.keys:
            assert await opens(gateway, key.sign(f"user-{key.algorithm}"))
        assert provider.jwks_requests == 1

        rsa = provider.keys[0]
        await refused(client, gateway, rsa.sign("alice", ttl_s=-60), "expired")
        forged = SigningKey.generate("rsa-1", "RS256")
        await refused(client, gateway, forged.sign("alice"), "Signature")

        # a connect storm with unknown kids: at most one fetch per interval
        await asyncio.sleep(MIN_REFRESH_S)
        storm = [rsa.sign("mallory", kid=f"made-up-{n}") for n in range(40)]
        await asyncio.gather(*(refused(client, gateway, t, "no signing key") for t in storm))
        assert provider.jwks_requests == 2
        await refused(client, gateway, rsa.sign("mallory", kid="made-up-again"), "no signing")
        assert provider.jwks_requests == 2

        # rotation: the provider publishes a new key and drops the old RSA one
        new = SigningKey.generate("rsa-2", "RS256")
        provider.keys = [new, *provider.keys[1:]]
        await asyncio.sleep(MIN_REFRESH_S)
        assert await opens(gateway, new.sign("alice"))
        assert provider.jwks_requests == 3
        await refused(client, gateway, rsa.sign("alice"), "no signing key")
        assert await opens(gateway, provider.keys[1].sign("bob"))  # a kept key still works
        assert provider.jwks_requests == 3


async def test_provider_down_keeps_known_keys(
    processes: Processes, provider: IdentityServer, tmp_path: Path
) -> None:
    """A minute of outage at the default intervals (`USERSTREAM_JWKS_REFRESH_S` 300 s,
    `USERSTREAM_JWKS_MIN_REFRESH_S` 30 s) sees at most two failed fetches; here the periodic
    refresh runs every `MIN_REFRESH_S` and the outage spans `OUTAGE_S`: more failed fetches,
    every one of which must keep the known keys."""
    provider.start()
    log_file = tmp_path / "gateway.log"
    gateway = start_gateway(
        processes, provider, log_file, USERSTREAM_JWKS_REFRESH_S=str(MIN_REFRESH_S)
    )
    provider.stop()
    key = provider.keys[2]
    async with httpx.AsyncClient(timeout=10) as client:
        await asyncio.sleep(MIN_REFRESH_S)
        # an unknown kid makes the gateway try the provider, which is down
        await refused(client, gateway, key.sign("alice", kid="rotated"), "no signing key")
        outage_ends = asyncio.get_running_loop().time() + OUTAGE_S
        while asyncio.get_running_loop().time() < outage_ends:
            assert await opens(gateway, key.sign("alice"))
            await asyncio.sleep(MIN_REFRESH_S / 2)
        ready = await client.get(f"{gateway.url}/readyz")
        assert ready.status_code == 200, ready.text
        auth = ready.json()["auth"]
        assert auth["jwks"] == "refresh failing, known keys kept"
        assert "Connection refused" in auth["last_error"]
        assert provider.jwks_requests == 1  # every fetch since failed
        failed = log_file.read_text().count("JWKS fetch failed, keeping 3 known keys")
        assert failed >= OUTAGE_S / MIN_REFRESH_S - 1

        # the provider is back, with a rotated key: picked up without a restart
        rotated = SigningKey.generate("rotated", "EdDSA")
        provider.keys = [*provider.keys, rotated]
        provider.start()

        async def recovered() -> bool:
            answer = await client.get(f"{gateway.url}/readyz")
            return bool(answer.json()["auth"]["jwks"] == "ok")

        await eventually(recovered, "a JWKS fetch after the outage", timeout_s=10)
    assert await opens(gateway, rotated.sign("alice"))


async def test_readyz_waits_for_the_first_load(
    processes: Processes, provider: IdentityServer
) -> None:
    gateway = start_gateway(processes, provider)  # the provider is not up yet
    async with httpx.AsyncClient(timeout=10) as client:
        ready = await client.get(f"{gateway.url}/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["auth"]["jwks"] == "never loaded"
        provider.start()

        async def loaded() -> bool:
            return (await client.get(f"{gateway.url}/readyz")).status_code == 200

        await eventually(loaded, "the first JWKS load", timeout_s=10)
    assert await opens(gateway, provider.keys[0].sign("alice"))
