"""Who is connecting: JWT bearer authentication (PROTOCOL.md §3).

Credentials are looked for in this order, and the first one present decides (an invalid
bearer token is refused even if a valid cookie is also sent): the `Authorization: Bearer`
header, the `userstream_token` cookie, the `access_token` query parameter (for cross-origin
EventSource, which cannot set headers; `gateway.logs` redacts it from every log line).
Tokens must carry `sub` and `exp`. HS256 with a shared secret, or RS256/ES256 with a PEM
public key (PyJWT).

Operators and services present static tokens instead (`USERSTREAM_ADMIN_TOKEN` for
`/admin/status`, `USERSTREAM_PUBLISH_TOKEN` for `/publish`), checked by `static_token_refusal`.
"""

import hmac
import time
from dataclasses import dataclass
from typing import Any

import jwt
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import Response

from gateway.problems import problem
from gateway.settings import Settings

COOKIE_NAME = "userstream_token"
QUERY_PARAMETER = "access_token"


class AuthError(Exception):
    """Authentication failed; the message says why (it becomes the 401 `detail`)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user: `user_id` from `sub`, `admin` from `system_role: "admin"`,
    `expires_at` from `exp` (epoch seconds)."""

    user_id: str
    admin: bool
    expires_at: float


class Authenticator:
    """Verifies tokens with the configured key. Raises ValueError when no key is configured."""

    def __init__(self, settings: Settings) -> None:
        self._key: str
        if settings.jwt_secret is not None:
            self._key, self._algorithms = settings.jwt_secret.get_secret_value(), ["HS256"]
        elif settings.jwt_public_key is not None:
            self._key, self._algorithms = settings.jwt_public_key, ["RS256", "ES256"]
        else:
            raise ValueError("set USERSTREAM_JWT_SECRET or USERSTREAM_JWT_PUBLIC_KEY")
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway_s = settings.jwt_leeway_s

    def authenticate(self, request: Request) -> Principal:
        """The principal of a request. Raises AuthError when the first credential present is
        missing, malformed, expired, badly signed, or lacks `sub` or `exp`."""
        return self.verify(_credential(request))

    def verify(self, token: str) -> Principal:
        """Decode and check one token. Raises AuthError with the reason."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
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

    def mint(self, user_id: str, ttl_s: float = 3600, **claims: Any) -> str:
        """A token for `user_id` valid `ttl_s` seconds (HS256 only: needs the shared secret).

        Raises ValueError when the gateway is configured with a public key.
        """
        if self._algorithms != ["HS256"]:
            raise ValueError("minting needs USERSTREAM_JWT_SECRET (a public key cannot sign)")
        now = int(time.time())
        payload = {"sub": user_id, "iat": now, "exp": now + int(ttl_s), **claims}
        return jwt.encode(payload, self._key, algorithm="HS256")


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
