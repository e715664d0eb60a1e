"""Forward auth: the core API says who a request is (`USERSTREAM_AUTH_URL`), as nginx
`auth_request`, Nchan's `nchan_authorize_request` and Pushpin do.

For a request to authenticate, the gateway sends `GET <USERSTREAM_AUTH_URL>` with the
request's `Cookie` and `Authorization` headers; an `access_token` query parameter (PROTOCOL.md
§3: cross-origin EventSource cannot set headers) is sent as `Authorization: Bearer <token>`
when the request has no `Authorization` header. A request with none of the three is refused
without a call. The upstream's answer decides:
- `200` with `{"userId": "<non-empty string>", "admin": <bool, optional>, "expiresAt": <epoch
  s, optional>}` (null is as absent): admitted; a stream ends with `event: close`
  `token_expired` at `expiresAt`;
- `401` or `403`: refused (the gateway answers 401);
- anything else (another status, a `200` body of another shape, a refused connection, no
  answer within `USERSTREAM_AUTH_TIMEOUT_S`): unavailable (the gateway answers 503 with
  `Retry-After`, and opens no stream).

Answers are cached by the SHA-256 of what is forwarded: an admission for
`USERSTREAM_AUTH_CACHE_S` (never past its `expiresAt`), a refusal for
`USERSTREAM_AUTH_FAILURE_CACHE_S`; an unavailable upstream is not cached. Concurrent checks of
one credential share one upstream call. The cache holds at most `MAX_CACHE_ENTRIES` answers.

Open streams are re-checked (`recheck`, called by the runtime every `recheck_every_s`): a
credential whose last answer is `USERSTREAM_AUTH_REVALIDATE_S` old is asked again, so a
revoked session ends its streams within that interval of its revocation, with `event: close`
`unauthorized`. An upstream that is unavailable during a re-check ends nothing.

No credential, cookie or upstream body is ever logged: lines name the user, the status or the
failure's kind only.

The HTTP client is aiohttp's: 72 µs of CPU per call, against 2.0 ms for httpx, with 50 calls
in flight (bench/RESULTS.md, "HTTP client for forward auth"). It keeps no cookies.
"""

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass

import aiohttp
import orjson
from starlette.requests import Request

from gateway.auth import QUERY_PARAMETER, Authenticator, AuthError, AuthUnavailable, Principal
from gateway.settings import Settings
from sync import metrics

logger = logging.getLogger(__name__)

MAX_CACHE_ENTRIES = 100_000
"""Most answers cached; past it the oldest are dropped first."""

MAX_BODY_BYTES = 65_536
"""Largest upstream answer body read, bytes; a longer one is an unavailable upstream."""

RETRY_AFTER_S = 2
"""`Retry-After` of the 503 answered while the upstream is unavailable, seconds."""

FORWARDED = ("cookie", "authorization")
"""Request headers sent to the upstream."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """The upstream refused the credential; `why` names how ("HTTP 401", ...)."""

    why: str


@dataclass(frozen=True, slots=True)
class Unavailable:
    """The upstream gave no usable answer; `why` names the failure (never its body)."""

    why: str


Answer = Principal | Refusal | Unavailable
"""What one upstream call decided."""


@dataclass(slots=True)
class _Cached:
    answer: Principal | Refusal
    checked_at: float  # time.monotonic() of the upstream answer
    valid_until: float  # time.monotonic() past which the answer is not used


def forwarded_headers(request: Request) -> dict[str, str]:
    """The headers sent to the upstream for `request` (see the module docstring). Raises
    AuthError when the request carries no credential at all."""
    headers = {name: value for name in FORWARDED if (value := request.headers.get(name))}
    if "authorization" not in headers:
        token = request.query_params.get(QUERY_PARAMETER)
        if token:
            headers["authorization"] = f"Bearer {token}"
    if not headers:
        raise AuthError(
            f"no credentials: send the session cookie, an Authorization header or the"
            f" {QUERY_PARAMETER} query parameter"
        )
    return headers


def credential_key(headers: dict[str, str]) -> str:
    """The cache key of forwarded `headers`: the hex SHA-256 of their names and values."""
    digest = hashlib.sha256()
    for name in FORWARDED:
        digest.update(f"{name}\0{headers.get(name, '')}\0".encode())
    return digest.hexdigest()


def parse_answer(status: int, body: bytes, now: float) -> Answer:
    """The decision of an upstream answer of `status` with `body` (see the module docstring),
    at `now` (epoch seconds): an admission whose `expiresAt` is past is a refusal."""
    if status in (401, 403):
        return Refusal(f"HTTP {status}")
    if status != 200:
        return Unavailable(f"HTTP {status}")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Unavailable("HTTP 200 whose body is not JSON")
    if not isinstance(data, dict):
        return Unavailable("HTTP 200 whose body is not a JSON object")
    return _admission(data, now)


def _admission(data: dict[str, object], now: float) -> Answer:
    """The decision of a `200` answer's JSON object (`parse_answer`)."""
    user_id = data.get("userId")
    admin = data.get("admin")
    if admin is None:  # null is as absent
        admin = False
    expires_at = data.get("expiresAt")
    if not isinstance(user_id, str) or not user_id:
        return Unavailable("HTTP 200 without a non-empty string userId")
    if not isinstance(admin, bool):
        return Unavailable("HTTP 200 whose admin is not a boolean")
    if expires_at is None:
        expires_at = math.inf
    elif isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        return Unavailable("HTTP 200 whose expiresAt is not a number")
    if expires_at <= now:
        return Refusal("expiresAt has passed")
    return Principal(user_id, admin, float(expires_at))


class ForwardAuthenticator(Authenticator):
    """Asks `USERSTREAM_AUTH_URL` who a request is, with the cache, coalescing and re-checks
    of the module docstring. Settings: `auth_url`, `auth_timeout_s`, `auth_cache_s`,
    `auth_failure_cache_s`, `auth_revalidate_s`, `auth_max_connections` (upstream
    connections at once). Raises ValueError without `auth_url`."""

    def __init__(self, settings: Settings) -> None:
        if settings.auth_url is None:
            raise ValueError("set USERSTREAM_AUTH_URL")
        self.url = settings.auth_url
        self._settings = settings
        recheck_every_s = self.recheck_every_s = min(1.0, settings.auth_revalidate_s / 4)
        # an answer this old is asked again by the next re-check, so none outlives revalidate_s
        self._due_after_s = settings.auth_revalidate_s - recheck_every_s
        self._session: aiohttp.ClientSession | None = None
        self._cache: dict[str, _Cached] = {}
        self._inflight: dict[str, asyncio.Task[Answer]] = {}
        self._held: dict[str, dict[str, str]] = {}  # what to forward on a re-check, by key
        self.calls = 0
        """Upstream calls started so far."""

    async def authenticate(self, request: Request) -> Principal:
        """The principal the upstream (or the cache) gives the request's credential. Raises
        AuthError when there is none or it is refused, AuthUnavailable when the upstream gives
        no usable answer."""
        headers = forwarded_headers(request)
        key = credential_key(headers)
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() < cached.valid_until:
            metrics.AUTH_CACHE.labels("hit").inc()
            answer: Answer = cached.answer
        else:
            metrics.AUTH_CACHE.labels("miss").inc()
            answer = await self._ask(key, headers)
        if isinstance(answer, Principal):
            self._held[key] = headers
            return Principal(answer.user_id, answer.admin, answer.expires_at, credential=key)
        if isinstance(answer, Refusal):
            raise AuthError(f"the session was refused by the auth service ({answer.why})")
        raise AuthUnavailable(
            f"the auth service gave no usable answer ({answer.why}); retry later",
            retry_after_s=RETRY_AFTER_S,
        )

    async def recheck(self, credentials: set[str]) -> dict[str, Principal | None]:
        """Ask the upstream again about each of `credentials` (keys of open streams) whose
        last answer is nearly `auth_revalidate_s` old (within one `recheck_every_s`), and
        forget the held credentials of keys no stream uses any more. Returns the fresh
        decisions: a Principal, or None when refused; keys not due, or whose upstream call
        failed, are left out (their streams go on)."""
        for key in self._held.keys() - credentials:
            del self._held[key]
        due_before = time.monotonic() - self._due_after_s
        due = [
            key
            for key in credentials
            if key in self._held
            and ((cached := self._cache.get(key)) is None or cached.checked_at <= due_before)
        ]
        answers = await asyncio.gather(*(self._ask(key, self._held[key]) for key in due))
        verdicts: dict[str, Principal | None] = {}
        unavailable = 0
        for key, answer in zip(due, answers, strict=True):
            if isinstance(answer, Unavailable):
                unavailable += 1
            else:
                verdicts[key] = answer if isinstance(answer, Principal) else None
        if unavailable:
            logger.warning(
                "auth service unavailable while re-checking %d of %d sessions; their streams go on",
                unavailable,
                len(due),
            )
        self._prune()
        return verdicts

    async def close(self) -> None:
        """Close the upstream connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _ask(self, key: str, headers: dict[str, str]) -> Answer:
        """The upstream's answer for `key`, sharing a call already under way; cached as the
        module docstring says."""
        task = self._inflight.get(key)
        if task is None:
            task = self._inflight[key] = asyncio.create_task(self._call(key, headers))
        # shield: a caller that goes away (client disconnect) does not cancel the shared call
        return await asyncio.shield(task)

    async def _call(self, key: str, headers: dict[str, str]) -> Answer:
        self.calls += 1
        try:
            answer = await self._fetch(headers)
        finally:
            del self._inflight[key]
        metrics.AUTH_UPSTREAM.labels(type(answer).__name__.lower()).inc()
        now = time.monotonic()
        if isinstance(answer, Principal):
            ttl = min(self._settings.auth_cache_s, answer.expires_at - time.time())
            self._remember(key, _Cached(answer, now, now + ttl))
        elif isinstance(answer, Refusal):
            self._remember(key, _Cached(answer, now, now + self._settings.auth_failure_cache_s))
        else:
            logger.warning("auth service unavailable: %s", answer.why)
        return answer

    async def _fetch(self, headers: dict[str, str]) -> Answer:
        session = self._session
        if session is None:
            connector = aiohttp.TCPConnector(limit=self._settings.auth_max_connections)
            # No cookie jar: a cookie the upstream sets (a rolling session) must never be sent
            # along with another user's request.
            session = self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._settings.auth_timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        try:
            async with session.get(self.url, headers=headers, allow_redirects=False) as response:
                body = b""
                while len(body) <= MAX_BODY_BYTES:  # read() returns what has arrived so far
                    part = await response.content.read(MAX_BODY_BYTES + 1 - len(body))
                    if not part:
                        break
                    body += part
                if len(body) > MAX_BODY_BYTES:
                    return Unavailable(f"an answer longer than {MAX_BODY_BYTES} bytes")
                return parse_answer(response.status, body, time.time())
        except TimeoutError:
            return Unavailable(f"no answer within {self._settings.auth_timeout_s:g} s")
        except aiohttp.ClientError as exc:
            return Unavailable(type(exc).__name__)

    def _remember(self, key: str, entry: _Cached) -> None:
        self._cache.pop(key, None)  # re-inserted last: the dict stays in order of answers
        self._cache[key] = entry
        if len(self._cache) > MAX_CACHE_ENTRIES:
            del self._cache[next(iter(self._cache))]

    def _prune(self) -> None:
        """Drop the answers older than `auth_cache_s` (no answer lives longer), from the
        oldest: the cache is in order of answers."""
        oldest_kept = time.monotonic() - self._settings.auth_cache_s
        cache = self._cache
        while cache:
            key = next(iter(cache))
            if cache[key].checked_at > oldest_kept:
                return
            del cache[key]
