"""Who is connecting: JWT bearer authentication (PROTOCOL.md §3).

Credentials are looked for in this order, and the first one present decides (an invalid
bearer token is refused even if a valid cookie is also sent): the `Authorization: Bearer`
header, the `userstream_token` cookie, the `access_token` query parameter (for cross-origin
EventSource, which cannot set headers; `gateway.logs` redacts it from every log line).
Tokens must carry `sub` and `exp`. HS256 with a shared secret, or RS256/ES256 with a PEM
public key (PyJWT), or RS256/ES256/EdDSA with the key named by the token's `kid` in an
identity provider's JWKS (`gateway.jwks`).

`Authenticator` is the interface `/me/stream`, `/me/presence` and `/me/ephemeral` use;
`gateway.runtime.make_authenticator` picks the implementation the settings configure: one of
the two here, or `gateway.forward_auth.ForwardAuthenticator`, which asks the core API instead.

Operators and services present static tokens instead (`USERSTREAM_ADMIN_TOKEN` for
`/admin/status`, `USERSTREAM_PUBLISH_TOKEN` for `/publish`), checked by `static_token_refusal`.
"""

import abc
import asyncio
import hmac
import time
from dataclasses import dataclass
from typing import Any

import jwt
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import Response

from gateway.jwks import JwksKeys
from gateway.problems import problem
from gateway.settings import Settings

COOKIE_NAME = "userstream_token"
QUERY_PARAMETER = "access_token"


class AuthError(Exception):
    """Authentication failed; the message says why (it becomes the `detail` of the answer:
    `status` 401 with `headers`)."""

    status = 401

    @property
    def headers(self) -> dict[str, str]:
        """Headers of the problem answer (RFC 9110 §11.6.1: a 401 names its scheme)."""
        return {"WWW-Authenticate": 'Bearer realm="userstream"'}


class AuthUnavailable(AuthError):
    """Who the request is could not be decided now (an auth service that is down or slow):
    answered 503 with `Retry-After: retry_after_s` (seconds), never with an open stream."""

    status = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        """`Retry-After` (RFC 9110 §10.2.3), in seconds."""
        return {"Retry-After": str(self.retry_after_s)}


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user: `user_id` from `sub`, `admin` from `system_role: "admin"`,
    `expires_at` from `exp` (epoch seconds; `math.inf` when the credential does not expire).
    `credential` names the credential for re-checks of open streams (`Authenticator.recheck`;
    a hash, never the credential itself), None where nothing is re-checked."""

    user_id: str
    admin: bool
    expires_at: float
    credential: str | None = None


class Authenticator(abc.ABC):
    """How a request proves who it is. Implementations: `JwtAuthenticator` (a configured
    key), `JwksAuthenticator` (keys from a JWKS URL), `gateway.forward_auth.
    ForwardAuthenticator` (the core API decides); `gateway.runtime.make_authenticator`
    chooses."""

    recheck_every_s: float | None = None
    """How often the runtime calls `recheck` with the credentials of the open streams,
    seconds; None: never (a token's validity is its `exp`, which the deadline sweep enforces)."""

    @abc.abstractmethod
    async def authenticate(self, request: Request) -> Principal:
        """The principal of a request. Raises AuthError (answered 401) when the request does
        not prove a user, AuthUnavailable (answered 503) when that cannot be decided now."""

    async def start(self) -> None:
        """Prepare before the gateway serves (e.g. a first key fetch); never raises for an
        unreachable dependency, which `readiness` reports instead."""
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """Background work until `stop` is set (none by default)."""
        return None

    def readiness(self) -> tuple[bool, dict[str, object] | None]:
        """(ready, report for `/readyz` or None): whether requests can be authenticated."""
        return True, None

    async def recheck(self, credentials: set[str]) -> dict[str, Principal | None]:
        """Fresh decisions about the `credential`s of open streams, for those due: a
        Principal (the stream goes on, until its `expires_at`), or None (revoked: the stream
        ends with `event: close` `unauthorized`). Keys left out are unchanged."""
        return {}

    async def close(self) -> None:
        """Release what the authenticator holds (connections) when the gateway stops."""
        return None

    def mint(self, user_id: str, ttl_s: float = 3600, **claims: Any) -> str:
        """A token for `user_id` (demo and `userstream token`). Raises ValueError unless the
        implementation holds a signing secret."""
        raise ValueError("minting needs USERSTREAM_JWT_SECRET (a public key cannot sign)")


def _decode(token: str, key: Any, algorithms: list[str], settings: Settings) -> Principal:
    """Check one token's signature, `exp`, `sub` and the configured `aud`/`iss` (PyJWT).
    Raises AuthError with the reason."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=settings.jwt_leeway_s,
            options={"require": ["exp", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise AuthError("invalid token: sub must be a non-empty string")
    return Principal(subject, claims.get("system_role") == "admin", float(claims["exp"]))


class JwtAuthenticator(Authenticator):
    """Verifies tokens with the configured key: `USERSTREAM_JWT_SECRET` (HS256) or
    `USERSTREAM_JWT_PUBLIC_KEY` (RS256/ES256). Raises ValueError when neither is set."""

    def __init__(self, settings: Settings) -> None:
        self._key: str
        if settings.jwt_secret is not None:
            self._key, self._algorithms = settings.jwt_secret.get_secret_value(), ["HS256"]
        elif settings.jwt_public_key is not None:
            self._key, self._algorithms = settings.jwt_public_key, ["RS256", "ES256"]
        else:
            raise ValueError(
                "set USERSTREAM_JWT_SECRET, USERSTREAM_JWT_PUBLIC_KEY or USERSTREAM_JWT_JWKS_URL"
            )
        self._settings = settings

    async def authenticate(self, request: Request) -> Principal:
        """The principal of a request. Raises AuthError when the first credential present is
        missing, malformed, expired, badly signed, or lacks `sub` or `exp`."""
        return self.verify(_credential(request))

    def verify(self, token: str) -> Principal:
        """Decode and check one token. Raises AuthError with the reason."""
        return _decode(token, self._key, self._algorithms, self._settings)

    def mint(self, user_id: str, ttl_s: float = 3600, **claims: Any) -> str:
        """A token for `user_id` valid `ttl_s` seconds (HS256 only: needs the shared secret).

        Raises ValueError when the gateway is configured with a public key.
        """
        if self._algorithms != ["HS256"]:
            return super().mint(user_id, ttl_s, **claims)
        now = int(time.time())
        payload = {"sub": user_id, "iat": now, "exp": now + int(ttl_s), **claims}
        return jwt.encode(payload, self._key, algorithm="HS256")


class JwksAuthenticator(Authenticator):
    """Verifies tokens with the key of the JWKS at `USERSTREAM_JWT_JWKS_URL` that the token
    header's `kid` names (RS256, ES256, EdDSA; the key's algorithm must be the token's `alg`).
    Keys are fetched, cached and refreshed by `gateway.jwks.JwksKeys`
    (`USERSTREAM_JWKS_MIN_REFRESH_S`, `USERSTREAM_JWKS_REFRESH_S`,
    `USERSTREAM_JWKS_TIMEOUT_S`). Raises ValueError without a JWKS URL."""

    def __init__(self, settings: Settings) -> None:
        if settings.jwt_jwks_url is None:
            raise ValueError("set USERSTREAM_JWT_JWKS_URL")
        self.keys = JwksKeys(
            settings.jwt_jwks_url,
            min_refresh_s=settings.jwks_min_refresh_s,
            refresh_s=settings.jwks_refresh_s,
            timeout_s=settings.jwks_timeout_s,
        )
        self._settings = settings

    async def start(self) -> None:
        """Fetch the key set once (a failure is logged and reported by `/readyz`)."""
        await self.keys.refresh()

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh the key set periodically until `stop` (`JwksKeys.run`)."""
        await self.keys.run(stop)

    def readiness(self) -> tuple[bool, dict[str, object] | None]:
        """Ready once the JWKS was loaded; a later failed refresh is reported, not refused
        (the keys already known keep verifying)."""
        keys = self.keys
        if not keys.loaded:
            state = "never loaded"
        else:
            state = "ok" if keys.last_error is None else "refresh failing, known keys kept"
        report: dict[str, object] = {
            "jwks": state,
            "kids": keys.kids(),
            "loaded_at": keys.loaded_at,
            "last_error": keys.last_error,
        }
        return keys.loaded, report

    async def authenticate(self, request: Request) -> Principal:
        """The principal of a request. Raises AuthError when the first credential present is
        missing, malformed, names no known `kid`, is expired, badly signed, or lacks `sub`
        or `exp`."""
        return await self.verify(_credential(request))

    async def verify(self, token: str) -> Principal:
        """Decode and check one token, refreshing the keys for an unknown `kid` as
        `JwksKeys.key` allows. Raises AuthError with the reason."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("invalid token: the header has no kid")
        key = await self.keys.key(kid)
        if key is None:
            raise AuthError(f"invalid token: no signing key with kid {kid[:64]!r}")
        if header.get("alg") != key.algorithm_name:
            raise AuthError(f"invalid token: the key {kid[:64]!r} is for {key.algorithm_name}")
        return _decode(token, key.key, [key.algorithm_name], self._settings)


def _credential(request: Request) -> str:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Authorization header must be 'Bearer <token>'")
        return token.strip()
    cookie = request.cookies.get(COOKIE_NAME)
    if cookie:
        return cookie
    query = request.query_params.get(QUERY_PARAMETER)
    if query:
        return query
    raise AuthError(
        f"no credentials: send 'Authorization: Bearer <token>', the {COOKIE_NAME} cookie "
        f"or the {QUERY_PARAMETER} query parameter"
    )


def static_token_refusal(request: Request, token: SecretStr | None, what: str) -> Response | None:
    """None when the request carries `Authorization: Bearer <token>`; else the answer of the
    `what` endpoint ("admin", "publish"), guarded by the static token of the setting
    `USERSTREAM_<WHAT>_TOKEN`: 404 (the endpoint is off) while `token` is unset, 401 with
    `WWW-Authenticate: Bearer` otherwise. The scheme is case-insensitive (RFC 9110 §11.1)
    and the token compared in constant time (`hmac.compare_digest`), so response times do
    not reveal how much of it matched."""
    if token is None:
        setting = f"USERSTREAM_{what.upper()}_TOKEN"
        return problem(404, f"the {what} endpoint is off: {setting} is not set")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected):
        return None
    return problem(401, f"{what} token missing or wrong", headers={"WWW-Authenticate": "Bearer"})
