"""Signing keys of an identity provider, from its JWKS URL (RFC 7517), kept by `kid`.

Fetching uses PyJWT's `PyJWKClient.fetch_data` (urllib, blocking) in a worker thread
(`asyncio.to_thread`), so the event loop never waits on the provider; parsing uses
`jwt.PyJWKSet`. The key set itself is kept here, not in `PyJWKClient`'s cache, whose entries
expire after a lifespan: a provider that is down must not take away keys that still verify.

Rules:
- A token whose `kid` is known is verified without any fetch.
- An unknown `kid` triggers a refresh at most once per `min_refresh_s` (any fetch counts,
  successful or not); concurrent callers share the one fetch under way. Past that limit the
  `kid` is simply unknown (the token is refused), so a connect storm with made-up `kid`s does
  not become a storm against the provider.
- A failed fetch keeps the last good key set; a successful one replaces it (a key the
  provider removed stops verifying).
- `run` refreshes every `refresh_s` once loaded, every `min_refresh_s` until then.
"""

import asyncio
import contextlib
import logging
import time
from typing import Any

import jwt

JWKS_ALGORITHMS = ("RS256", "ES256", "EdDSA")
"""Algorithms accepted from a JWKS; a key's own algorithm must match the token's `alg`."""

logger = logging.getLogger(__name__)


def parse_jwks(data: Any) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWKS document (`{"keys": [...]}`) by `kid`: keys with a `kid`, an
    algorithm of `JWKS_ALGORITHMS` (from `alg`, or inferred from `kty`/`crv`) and `use` unset
    or `sig`; others are skipped. Raises ValueError (or `jwt.PyJWKSetError`, a subclass of
    `jwt.PyJWTError`) when no key is usable."""
    if not isinstance(data, dict):
        raise ValueError("the JWKS is not a JSON object")
    keys = {
        key.key_id: key
        for key in jwt.PyJWKSet.from_dict(data).keys
        if key.key_id
        and key.algorithm_name in JWKS_ALGORITHMS
        and key.public_key_use in (None, "sig")
    }
    if not keys:
        raise ValueError("the JWKS has no signing key with a kid for RS256, ES256 or EdDSA")
    return keys


class JwksKeys:
    """The key set of one JWKS URL, refreshed as the module docstring says.

    `min_refresh_s`: least seconds between fetches caused by unknown `kid`s (and by `run`);
    `refresh_s`: period of `run`'s refresh once loaded; `timeout_s`: HTTP timeout of a fetch.
    """

    def __init__(
        self, url: str, *, min_refresh_s: float, refresh_s: float, timeout_s: float
    ) -> None:
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=timeout_s)
        self._min_refresh_s = min_refresh_s
        self._refresh_s = refresh_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_attempt: float | None = None  # time.monotonic() of the last fetch start
        self._inflight: asyncio.Task[bool] | None = None
        self.loaded_at: float | None = None
        """Epoch seconds of the last successful fetch; None until the first."""
        self.last_error: str | None = None
        """Why the last fetch failed; None after a successful one."""
        self.fetches = 0
        """Fetches started so far."""

    @property
    def loaded(self) -> bool:
        """True once a fetch has succeeded (keys are never dropped after that)."""
        return self.loaded_at is not None

    def kids(self) -> list[str]:
        """The `kid`s of the current key set, sorted."""
        return sorted(self._keys)

    async def refresh(self) -> bool:
        """Fetch the key set now, or wait for the fetch already under way; True when that
        fetch succeeded. Never raises for a provider failure (see `last_error`)."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch(), name="jwks-fetch")
        # shield: a caller that goes away (client disconnect) does not cancel the shared fetch
        return await asyncio.shield(self._inflight)

    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The key `kid`, refreshing first if it is unknown and the rate limit allows (or a
        fetch is already under way); None when it is still unknown."""
        found = self._keys.get(kid)
        if found is not None:
            return found
        if self._inflight is not None or self._may_fetch():
            await self.refresh()
        return self._keys.get(kid)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every `refresh_s` seconds (every `min_refresh_s` while never loaded) until
        `stop` is set, skipping a turn when a fetch happened less than `min_refresh_s` ago."""
        while not stop.is_set():
            interval = self._refresh_s if self.loaded else self._min_refresh_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
                return
            if self._may_fetch():
                await self.refresh()

    def _may_fetch(self) -> bool:
        last = self._last_attempt
        return last is None or time.monotonic() - last >= self._min_refresh_s

    async def _fetch(self) -> bool:
        self._last_attempt = time.monotonic()
        self.fetches += 1
        try:
            keys = parse_jwks(await asyncio.to_thread(self._client.fetch_data))
        except Exception as exc:  # any failure keeps the last good key set
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "JWKS fetch failed, keeping %d known keys: %s", len(self._keys), self.last_error
            )
            return False
        finally:
            self._inflight = None
        changed = keys.keys() != self._keys.keys()
        self._keys = keys
        self.loaded_at = time.time()
        self.last_error = None
        (logger.info if changed else logger.debug)("JWKS loaded: kids %s", ", ".join(keys))
        return True
