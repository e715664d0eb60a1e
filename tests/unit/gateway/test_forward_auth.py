"""Forward auth (gateway.forward_auth) against a real local core API (`IdentityServer`): how
answers are read, what is forwarded, the cache of admissions and refusals, one upstream call
for concurrent checks, re-checks of open streams, an unavailable upstream, settings, metrics."""

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator

import orjson
import pydantic
import pytest
from prometheus_client import REGISTRY
from starlette.requests import Request

from gateway.auth import AuthError, AuthUnavailable, Principal
from gateway.forward_auth import (
    MAX_BODY_BYTES,
    RETRY_AFTER_S,
    ForwardAuthenticator,
    Refusal,
    Unavailable,
    credential_key,
    forwarded_headers,
    parse_answer,
)
from gateway.runtime import make_authenticator
from gateway.settings import Settings
from tests.identity_server import SESSION_COOKIE, IdentityServer

MARKER = "MARKER-body-7f3a"
"""Put in upstream bodies: no reason, message or log line may repeat it."""

CACHE_S = 0.3
REVALIDATE_S = 0.4
DUE_AFTER_S = 0.45  # REVALIDATE_S past an answer, a re-check asks again


def request(
    cookie: str | None = None,
    authorization: str | None = None,
    query: str = "",
    other: dict[str, str] | None = None,
) -> Request:
    """A Starlette request to `/me/stream` with these headers and query string."""
    headers = [(b"cookie", cookie), (b"authorization", authorization)]
    headers += [(name.lower().encode(), value) for name, value in (other or {}).items()]
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/me/stream",
        "query_string": query.encode(),
        "headers": [(name, value.encode()) for name, value in headers if value is not None],
    }
    return Request(scope)


def cookie_of(session: str) -> Request:
    """A request carrying `session` in the `session` cookie, as a browser sends it."""
    return request(cookie=f"theme=dark; session={session}")


def settings(url: str, **overrides: object) -> Settings:
    """Settings of forward auth at `url` (a 2 s timeout unless overridden)."""
    return Settings.model_validate({"auth_url": url, "auth_timeout_s": 2, **overrides})


def sample(name: str, **labels: str) -> float:
    """The value of a sample of the default Prometheus registry (0 before its first count)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def server() -> Iterator[IdentityServer]:
    """A started IdentityServer, stopped after the test."""
    running = IdentityServer().start()
    yield running
    running.stop()


Factory = Callable[..., ForwardAuthenticator]


@pytest.fixture
async def make(server: IdentityServer) -> AsyncIterator[Factory]:
    """ForwardAuthenticators asking `server`, with settings overridden; closed afterwards."""
    made: list[ForwardAuthenticator] = []

    def factory(**overrides: object) -> ForwardAuthenticator:
        made.append(ForwardAuthenticator(settings(server.check_url, **overrides)))
        return made[-1]

    yield factory
    for auth in made:
        await auth.close()


# parse_answer


def test_admission_reads_user_admin_and_expiry() -> None:
    now = time.time()
    body = orjson.dumps({"userId": "alice", "admin": True, "expiresAt": int(now) + 60})
    assert parse_answer(200, body, now) == Principal("alice", True, float(int(now) + 60))
    plain = parse_answer(200, b'{"userId": "bob", "extra": [1]}', now)
    assert plain == Principal("bob", False, math.inf)
    fractional = parse_answer(200, orjson.dumps({"userId": "c", "expiresAt": now + 0.5}), now)
    assert isinstance(fractional, Principal) and fractional.expires_at == now + 0.5
    assert fractional.credential is None
    nulls = parse_answer(200, b'{"userId": "d", "admin": null, "expiresAt": null}', now)
    assert nulls == Principal("d", False, math.inf)  # null is as absent


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_refusals(status: int) -> None:
    answer = parse_answer(status, MARKER.encode(), time.time())
    assert answer == Refusal(f"HTTP {status}")


@pytest.mark.parametrize("status", [500, 502, 302, 404, 201, 204])
def test_other_statuses_are_unavailable(status: int) -> None:
    body = orjson.dumps({"userId": "alice", "note": MARKER})
    answer = parse_answer(status, body, time.time())
    assert answer == Unavailable(f"HTTP {status}")


BAD_BODIES = [
    f"{MARKER} is not JSON".encode(),
    b"",
    orjson.dumps([MARKER]),
    orjson.dumps(MARKER),
    b"null",
    orjson.dumps({"user": MARKER}),
    orjson.dumps({"userId": "", "note": MARKER}),
    orjson.dumps({"userId": 42, "note": MARKER}),
    orjson.dumps({"userId": None, "note": MARKER}),
    orjson.dumps({"userId": [MARKER]}),
    orjson.dumps({"userId": MARKER, "admin": "yes"}),
    orjson.dumps({"userId": "alice", "admin": 1, "note": MARKER}),
    orjson.dumps({"userId": "alice", "admin": 0}),
    orjson.dumps({"userId": "alice", "expiresAt": MARKER}),
    orjson.dumps({"userId": "alice", "expiresAt": True}),
    orjson.dumps({"userId": "alice", "expiresAt": False}),
    orjson.dumps({"userId": "alice", "expiresAt": [1], "note": MARKER}),
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_200_of_another_shape_is_unavailable_and_never_quoted(body: bytes) -> None:
    answer = parse_answer(200, body, time.time())
    assert isinstance(answer, Unavailable)
    assert answer.why.startswith("HTTP 200")
    assert MARKER not in answer.why and "alice" not in answer.why


def test_past_expiry_is_a_refusal() -> None:
    now = time.time()
    for expires_at in (now - 60, now, 0):
        body = orjson.dumps({"userId": "alice", "expiresAt": expires_at})
        assert parse_answer(200, body, now) == Refusal("expiresAt has passed")


# forwarded_headers and credential_key


def test_cookie_and_authorization_are_forwarded_and_nothing_else() -> None:
    both = request(
        cookie="session=s1",
        authorization="Bearer t1",
        other={"X-Other": "secret", "User-Agent": "ua", "X-Forwarded-For": "10.0.0.1"},
    )
    assert forwarded_headers(both) == {"cookie": "session=s1", "authorization": "Bearer t1"}
    assert forwarded_headers(request(cookie="session=s1", other={"X-Other": "x"})) == {
        "cookie": "session=s1"
    }
    # any scheme is forwarded as is: the upstream decides what it accepts
    assert forwarded_headers(request(authorization="Basic dTpw")) == {"authorization": "Basic dTpw"}


def test_query_token_is_sent_as_bearer_unless_a_header_is_present() -> None:
    assert forwarded_headers(request(query="access_token=q1&lastEventId=5")) == {
        "authorization": "Bearer q1"
    }
    assert forwarded_headers(request(cookie="session=s1", query="access_token=q1")) == {
        "cookie": "session=s1",
        "authorization": "Bearer q1",
    }
    assert forwarded_headers(request(authorization="Bearer h1", query="access_token=q1")) == {
        "authorization": "Bearer h1"
    }


@pytest.mark.parametrize(
    "bare",
    [
        request(),
        request(other={"X-Other": "x"}),
        request(query="access_token="),
        request(query="token=q1"),
        request(cookie="", authorization=""),
    ],
)
def test_no_credential_is_refused_without_a_call(bare: Request) -> None:
    with pytest.raises(AuthError) as refused:
        forwarded_headers(bare)
    assert type(refused.value) is AuthError and refused.value.status == 401
    assert "access_token" in str(refused.value)


def test_credential_key_is_a_stable_hash_naming_each_header() -> None:
    headers = {"cookie": "session=secret-value"}
    key = credential_key(headers)
    assert re.fullmatch("[0-9a-f]{64}", key)
    assert key == credential_key({"cookie": "session=secret-value"})
    assert "secret-value" not in key
    keys = {
        key,
        credential_key({"cookie": "session=other"}),
        credential_key({"authorization": "session=secret-value"}),
        credential_key({"cookie": "session=secret-value", "authorization": "Bearer t"}),
        credential_key({"authorization": "Bearer t"}),
        credential_key({"authorization": "Bearer u"}),
    }
    assert len(keys) == 6
    # the key of a request is the key of what it forwards
    assert credential_key(forwarded_headers(request(query="access_token=t"))) == credential_key(
        {"authorization": "Bearer t"}
    )


# ForwardAuthenticator: admissions and refusals


async def test_admitted_by_cookie_and_by_bearer(server: IdentityServer, make: Factory) -> None:
    auth = make()
    expires_at = int(time.time()) + 600
    alice = server.session("alice", admin=True, expiresAt=expires_at)
    bob = server.session("bob")
    by_cookie = await auth.authenticate(cookie_of(alice))
    assert (by_cookie.user_id, by_cookie.admin, by_cookie.expires_at) == (
        "alice",
        True,
        float(expires_at),
    )
    assert by_cookie.credential == credential_key({"cookie": f"theme=dark; session={alice}"})
    by_bearer = await auth.authenticate(request(authorization=f"Bearer {bob}"))
    assert (by_bearer.user_id, by_bearer.admin, by_bearer.expires_at) == ("bob", False, math.inf)
    assert by_bearer.credential == credential_key({"authorization": f"Bearer {bob}"})
    by_query = await auth.authenticate(request(query=f"access_token={bob}"))
    assert by_query.user_id == "bob" and by_query.credential == by_bearer.credential
    assert server.check_requests == 2  # the query token shares the bearer's cached answer
    assert auth.calls == 2


async def test_exactly_cookie_and_authorization_reach_the_upstream(
    server: IdentityServer, make: Factory
) -> None:
    auth = make()
    alice, bob = server.session("alice"), server.session("bob")
    await auth.authenticate(
        request(cookie=f"session={alice}", other={"X-Other": "x", "X-Api-Key": "k"})
    )
    await auth.authenticate(request(authorization=f"Bearer {bob}", other={"X-Other": "x"}))
    await auth.authenticate(request(query=f"access_token={alice}"))
    await auth.authenticate(request(cookie="session=unknown", authorization=f"Bearer {bob}"))
    assert server.forwarded == [
        {"Cookie": f"session={alice}"},
        {"Authorization": f"Bearer {bob}"},
        {"Authorization": f"Bearer {alice}"},
        {"Cookie": "session=unknown", "Authorization": f"Bearer {bob}"},
    ]


@pytest.mark.parametrize("status", [401, 403])
async def test_refusals_answer_401(server: IdentityServer, make: Factory, status: int) -> None:
    auth = make()
    alice = server.session("alice")
    server.check_status = status
    server.check_body = orjson.dumps({"error": MARKER})
    with pytest.raises(AuthError) as refused:
        await auth.authenticate(cookie_of(alice))
    assert type(refused.value) is AuthError and refused.value.status == 401
    assert "WWW-Authenticate" in refused.value.headers
    assert f"HTTP {status}" in str(refused.value)
    assert MARKER not in str(refused.value) and alice not in str(refused.value)


async def test_unknown_session_is_refused(server: IdentityServer, make: Factory) -> None:
    auth = make()
    with pytest.raises(AuthError) as refused:
        await auth.authenticate(request(authorization="Bearer sess-nobody"))
    assert type(refused.value) is AuthError and refused.value.status == 401
    assert server.check_requests == 1


async def test_no_credential_makes_no_call(server: IdentityServer, make: Factory) -> None:
    auth = make()
    with pytest.raises(AuthError):
        await auth.authenticate(request(other={"X-Other": "x"}))
    assert server.check_requests == 0 and auth.calls == 0


# ForwardAuthenticator: an unavailable upstream


def _failing(server: IdentityServer) -> dict[str, object]:
    server.failing = True
    return {}


def _stopped(server: IdentityServer) -> dict[str, object]:
    server.stop()
    return {}


def _slow(server: IdentityServer) -> dict[str, object]:
    server.delay_s = 0.5
    return {"auth_timeout_s": 0.2}


def _oversized(server: IdentityServer) -> dict[str, object]:
    server.check_status = 200
    server.check_body = orjson.dumps({"userId": "alice", "pad": "x" * MAX_BODY_BYTES})
    return {}


def _malformed(server: IdentityServer) -> dict[str, object]:
    server.check_body = orjson.dumps({"userId": 7, "note": MARKER})
    return {}


def _server_error(server: IdentityServer) -> dict[str, object]:
    server.check_status = 500
    server.check_body = MARKER.encode()
    return {}


def _redirect(server: IdentityServer) -> dict[str, object]:
    server.check_status = 302
    return {}


@pytest.mark.parametrize(
    "outage", [_failing, _stopped, _slow, _oversized, _malformed, _server_error, _redirect]
)
async def test_unavailable_upstream_answers_503_and_is_not_cached(
    server: IdentityServer,
    make: Factory,
    outage: Callable[[IdentityServer], dict[str, object]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice = server.session("alice")
    auth = make(**outage(server))
    served_before = server.check_requests
    for attempt in (1, 2):
        with (
            caplog.at_level(logging.WARNING, logger="gateway.forward_auth"),
            pytest.raises(AuthUnavailable) as unavailable,
        ):
            await auth.authenticate(cookie_of(alice))
        assert unavailable.value.status == 503
        assert unavailable.value.retry_after_s == RETRY_AFTER_S
        assert unavailable.value.headers == {"Retry-After": str(RETRY_AFTER_S)}
        assert MARKER not in str(unavailable.value) and alice not in str(unavailable.value)
        assert auth.calls == attempt  # not cached: each request asks again
    if outage is not _stopped:
        assert server.check_requests == served_before + 2
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "auth service unavailable" in logged
    assert MARKER not in logged and alice not in logged


async def test_admitted_again_once_the_upstream_is_back(
    server: IdentityServer, make: Factory
) -> None:
    auth = make()
    alice = server.session("alice")
    server.failing = True
    with pytest.raises(AuthUnavailable):
        await auth.authenticate(cookie_of(alice))
    server.failing = False
    assert (await auth.authenticate(cookie_of(alice))).user_id == "alice"
    bob = server.session("bob")
    server.stop()
    with pytest.raises(AuthUnavailable, match=r"ClientConnectorError|ServerDisconnectedError"):
        await auth.authenticate(cookie_of(bob))
    server.start()
    assert (await auth.authenticate(cookie_of(bob))).user_id == "bob"
    assert auth.calls == 4


async def test_timeout_is_named(server: IdentityServer, make: Factory) -> None:
    auth = make(auth_timeout_s=0.2)
    server.delay_s = 0.5
    with pytest.raises(AuthUnavailable, match=r"no answer within 0\.2 s"):
        await auth.authenticate(cookie_of(server.session("alice")))


# ForwardAuthenticator: the cache


async def test_cache_hits_make_no_call(server: IdentityServer, make: Factory) -> None:
    auth = make()
    alice = server.session("alice")
    principals = [await auth.authenticate(cookie_of(alice)) for _ in range(10)]
    assert {p.user_id for p in principals} == {"alice"}
    assert len({p.credential for p in principals}) == 1
    assert server.check_requests == 1 and auth.calls == 1


async def test_admissions_expire_after_auth_cache_s(server: IdentityServer, make: Factory) -> None:
    auth = make(auth_cache_s=CACHE_S, auth_failure_cache_s=CACHE_S)
    alice = server.session("alice")
    await auth.authenticate(cookie_of(alice))
    server.revoke(alice)
    assert (await auth.authenticate(cookie_of(alice))).user_id == "alice"  # from the cache
    assert server.check_requests == 1
    await asyncio.sleep(CACHE_S + 0.05)
    with pytest.raises(AuthError) as refused:
        await auth.authenticate(cookie_of(alice))
    assert refused.value.status == 401
    assert server.check_requests == 2


async def test_admissions_never_outlive_expires_at(server: IdentityServer, make: Factory) -> None:
    auth = make(auth_cache_s=30)
    expires_at = time.time() + 0.4
    alice = server.session("alice", expiresAt=expires_at)
    assert (await auth.authenticate(cookie_of(alice))).expires_at == expires_at
    assert (await auth.authenticate(cookie_of(alice))).expires_at == expires_at
    assert server.check_requests == 1
    await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.05)
    with pytest.raises(AuthError, match="expiresAt has passed") as refused:
        await auth.authenticate(cookie_of(alice))
    assert refused.value.status == 401
    assert server.check_requests == 2  # asked again, not served the stale admission


async def test_refusals_are_cached_for_auth_failure_cache_s(
    server: IdentityServer, make: Factory
) -> None:
    auth = make(auth_cache_s=30, auth_failure_cache_s=CACHE_S)
    for _ in range(3):
        with pytest.raises(AuthError):
            await auth.authenticate(cookie_of("sess-late"))
    assert server.check_requests == 1
    server.sessions["sess-late"] = {"userId": "alice"}  # the session now exists
    with pytest.raises(AuthError):
        await auth.authenticate(cookie_of("sess-late"))  # the refusal is still cached
    assert server.check_requests == 1
    await asyncio.sleep(CACHE_S + 0.05)
    assert (await auth.authenticate(cookie_of("sess-late"))).user_id == "alice"
    assert server.check_requests == 2


async def test_zero_cache_asks_every_time(server: IdentityServer, make: Factory) -> None:
    auth = make(auth_cache_s=0, auth_failure_cache_s=0)
    alice = server.session("alice")
    for _ in range(3):
        await auth.authenticate(cookie_of(alice))
    assert server.check_requests == 3


# ForwardAuthenticator: one call for concurrent checks


async def test_concurrent_checks_share_one_call(server: IdentityServer, make: Factory) -> None:
    auth = make()
    alice = server.session("alice")
    server.delay_s = 0.3
    principals = await asyncio.gather(*(auth.authenticate(cookie_of(alice)) for _ in range(20)))
    assert [p.user_id for p in principals] == ["alice"] * 20
    assert server.check_requests == 1 and auth.calls == 1


async def test_concurrent_refusals_share_one_call(server: IdentityServer, make: Factory) -> None:
    auth = make()
    server.delay_s = 0.3
    results = await asyncio.gather(
        *(auth.authenticate(cookie_of("sess-nobody")) for _ in range(10)), return_exceptions=True
    )
    assert all(type(result) is AuthError for result in results)
    assert server.check_requests == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_call(
    server: IdentityServer, make: Factory
) -> None:
    auth = make()
    alice = server.session("alice")
    server.delay_s = 0.3
    callers = [asyncio.create_task(auth.authenticate(cookie_of(alice))) for _ in range(3)]
    await asyncio.sleep(0.1)
    callers[0].cancel()
    principals = await asyncio.gather(*callers[1:])
    assert [p.user_id for p in principals] == ["alice", "alice"]
    with pytest.raises(asyncio.CancelledError):
        await callers[0]
    assert server.check_requests == 1


async def test_the_call_of_a_lone_cancelled_caller_goes_on(
    server: IdentityServer, make: Factory
) -> None:
    auth = make()
    alice = server.session("alice")
    server.delay_s = 0.3
    lone = asyncio.create_task(auth.authenticate(cookie_of(alice)))
    await asyncio.sleep(0.1)
    lone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lone
    # a later caller joins the call still under way, then the cache answers
    assert (await auth.authenticate(cookie_of(alice))).user_id == "alice"
    assert (await auth.authenticate(cookie_of(alice))).user_id == "alice"
    assert server.check_requests == 1 and auth.calls == 1


# ForwardAuthenticator: re-checks of open streams


async def admitted_key(auth: ForwardAuthenticator, session: str) -> str:
    """The credential key of `session`, admitted by `auth` (as a stream opens)."""
    key = (await auth.authenticate(cookie_of(session))).credential
    assert key is not None
    return key


async def test_recheck_asks_nothing_before_it_is_due(server: IdentityServer, make: Factory) -> None:
    auth = make(auth_revalidate_s=REVALIDATE_S)
    assert auth.recheck_every_s == pytest.approx(REVALIDATE_S / 4)
    keys = {await admitted_key(auth, server.session(user)) for user in ("alice", "bob")}
    assert await auth.recheck(keys) == {}
    assert await auth.recheck(set()) == {}
    assert await auth.recheck({"0" * 64}) == {}  # a key never admitted here
    assert server.check_requests == 2 and auth.calls == 2


async def test_recheck_ends_revoked_sessions_only(server: IdentityServer, make: Factory) -> None:
    auth = make(auth_revalidate_s=REVALIDATE_S)
    alice, bob = server.session("alice", admin=True), server.session("bob")
    alice_key, bob_key = await admitted_key(auth, alice), await admitted_key(auth, bob)
    await asyncio.sleep(DUE_AFTER_S)
    server.revoke(bob)
    verdicts = await auth.recheck({alice_key, bob_key})
    assert verdicts.keys() == {alice_key, bob_key}
    still = verdicts[alice_key]
    assert isinstance(still, Principal) and (still.user_id, still.admin) == ("alice", True)
    assert verdicts[bob_key] is None
    assert server.check_requests == 4
    assert server.forwarded[2:] in (
        [{"Cookie": f"theme=dark; session={alice}"}, {"Cookie": f"theme=dark; session={bob}"}],
        [{"Cookie": f"theme=dark; session={bob}"}, {"Cookie": f"theme=dark; session={alice}"}],
    )
    # the fresh answers are cached: bob is refused and alice admitted without a call
    with pytest.raises(AuthError):
        await auth.authenticate(cookie_of(bob))
    assert (await auth.authenticate(cookie_of(alice))).user_id == "alice"
    # and the next re-check is due only REVALIDATE_S later again
    assert await auth.recheck({alice_key, bob_key}) == {}
    assert server.check_requests == 4


async def test_unavailable_during_recheck_ends_nothing(
    server: IdentityServer, make: Factory
) -> None:
    auth = make(auth_revalidate_s=REVALIDATE_S)
    alice = server.session("alice")
    key = await admitted_key(auth, alice)
    await asyncio.sleep(DUE_AFTER_S)
    server.failing = True
    assert await auth.recheck({key}) == {}
    assert server.check_requests == 2
    server.failing = False
    # still due: the failed re-check did not count as an answer
    verdicts = await auth.recheck({key})
    assert isinstance(verdicts[key], Principal)
    assert server.check_requests == 3
    server.stop()
    await asyncio.sleep(DUE_AFTER_S)
    assert await auth.recheck({key}) == {}
    assert auth.calls == 4


async def test_recheck_forgets_keys_no_longer_passed(server: IdentityServer, make: Factory) -> None:
    auth = make(auth_revalidate_s=REVALIDATE_S)
    alice_key = await admitted_key(auth, server.session("alice"))
    bob_key = await admitted_key(auth, server.session("bob"))
    assert await auth.recheck({alice_key}) == {}  # bob's streams are gone
    await asyncio.sleep(DUE_AFTER_S)
    verdicts = await auth.recheck({alice_key, bob_key})
    assert verdicts.keys() == {alice_key}
    assert server.check_requests == 3  # alice only


async def test_close_is_idempotent_and_the_authenticator_reopens(
    server: IdentityServer, make: Factory
) -> None:
    auth = make()
    await auth.close()  # nothing opened yet
    assert (await auth.authenticate(cookie_of(server.session("alice")))).user_id == "alice"
    await auth.close()
    await auth.close()
    assert (await auth.authenticate(cookie_of(server.session("bob")))).user_id == "bob"
    assert server.check_requests == 2


# Settings and the runtime


def test_failure_cache_may_not_exceed_the_admission_cache() -> None:
    with pytest.raises(pydantic.ValidationError, match="AUTH_FAILURE_CACHE_S"):
        settings("http://127.0.0.1:1/check", auth_cache_s=1, auth_failure_cache_s=2)
    equal = settings("http://127.0.0.1:1/check", auth_cache_s=1, auth_failure_cache_s=1)
    assert equal.auth_failure_cache_s == equal.auth_cache_s == 1


def test_auth_url_excludes_the_jwt_settings() -> None:
    with pytest.raises(pydantic.ValidationError, match="only one of"):
        settings("http://127.0.0.1:1/check", jwt_secret="s" * 32)
    with pytest.raises(pydantic.ValidationError, match="only one of"):
        settings("http://127.0.0.1:1/check", jwt_jwks_url="http://127.0.0.1:1/jwks")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("auth_timeout_s", 0),
        ("auth_revalidate_s", 0),
        ("auth_cache_s", -1),
        ("auth_max_connections", 0),
    ],
)
def test_auth_settings_are_bounded(name: str, value: float) -> None:
    with pytest.raises(pydantic.ValidationError, match=name):
        settings("http://127.0.0.1:1/check", **{name: value})


def test_empty_auth_url_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("JWT_PUBLIC_KEY", "JWT_JWKS_URL", "AUTH_URL"):
        monkeypatch.delenv(f"USERSTREAM_{name}", raising=False)
    monkeypatch.setenv("USERSTREAM_JWT_SECRET", "s" * 32)
    monkeypatch.setenv("USERSTREAM_AUTH_URL", "")
    assert Settings().auth_url is None  # and so not in conflict with the JWT secret
    monkeypatch.delenv("USERSTREAM_JWT_SECRET")
    monkeypatch.setenv("USERSTREAM_AUTH_URL", "http://core.internal/auth/check")
    configured = Settings()
    assert configured.auth_url == "http://core.internal/auth/check"
    auth = make_authenticator(configured)
    assert isinstance(auth, ForwardAuthenticator)
    assert auth.url == "http://core.internal/auth/check"
    assert auth.recheck_every_s is not None


def test_forward_authenticator_needs_auth_url() -> None:
    with pytest.raises(ValueError, match="USERSTREAM_AUTH_URL"):
        ForwardAuthenticator(Settings.model_validate({}))


# Metrics


async def test_metrics_count_upstream_outcomes_and_cache_lookups(
    server: IdentityServer, make: Factory
) -> None:
    names = {
        "principal": ("userstream_auth_upstream_calls_total", "outcome", "principal"),
        "refusal": ("userstream_auth_upstream_calls_total", "outcome", "refusal"),
        "unavailable": ("userstream_auth_upstream_calls_total", "outcome", "unavailable"),
        "hit": ("userstream_auth_cache_lookups_total", "result", "hit"),
        "miss": ("userstream_auth_cache_lookups_total", "result", "miss"),
    }

    def counts() -> dict[str, float]:
        return {key: sample(name, **{label: value}) for key, (name, label, value) in names.items()}

    auth = make()
    alice = server.session("alice")
    before = counts()
    await auth.authenticate(cookie_of(alice))  # miss, principal
    await auth.authenticate(cookie_of(alice))  # hit
    for _ in range(2):  # miss, refusal; then hit
        with pytest.raises(AuthError):
            await auth.authenticate(cookie_of("sess-nobody"))
    server.failing = True
    for _ in range(2):  # miss, unavailable (twice: not cached)
        with pytest.raises(AuthUnavailable):
            await auth.authenticate(cookie_of("sess-other"))
    server.failing = False
    server.delay_s = 0.2
    bob = server.session("bob")
    await asyncio.gather(*(auth.authenticate(cookie_of(bob)) for _ in range(5)))  # 5 misses
    after = counts()
    delta = {key: after[key] - before[key] for key in names}
    assert delta == {"principal": 2, "refusal": 1, "unavailable": 2, "hit": 2, "miss": 9}


async def test_an_answer_arriving_in_parts_is_read_whole(
    server: IdentityServer, make: Factory
) -> None:
    server.split_at = 1000
    alice = server.session("alice", pad="x" * (MAX_BODY_BYTES // 2))
    assert (await make().authenticate(cookie_of(alice))).user_id == "alice"


async def test_an_oversized_answer_arriving_in_parts_is_refused_for_its_length(
    server: IdentityServer, make: Factory
) -> None:
    server.split_at = 1000
    alice = server.session("alice", pad="x" * MAX_BODY_BYTES)
    with pytest.raises(AuthUnavailable, match=f"longer than {MAX_BODY_BYTES} bytes"):
        await make().authenticate(cookie_of(alice))


async def test_cookies_set_by_the_upstream_are_never_sent_for_another_request(
    server: IdentityServer,
) -> None:
    alice, bob = server.session("alice"), server.session("bob")
    # a rolling session renews alice's cookie; by host name, since a cookie jar keeps no
    # cookie of a bare IP address
    server.check_headers = {"Set-Cookie": f"{SESSION_COOKIE}={alice}; Path=/; HttpOnly"}
    auth = ForwardAuthenticator(settings(f"http://localhost:{server.port}/check"))
    try:
        assert (await auth.authenticate(cookie_of(alice))).user_id == "alice"
        assert (await auth.authenticate(cookie_of(bob))).user_id == "bob"
        with pytest.raises(AuthError):  # no cookie sent: an unknown bearer
            await auth.authenticate(request(authorization="Bearer t"))
    finally:
        await auth.close()
    cookies = [sent.get("Cookie") for sent in server.forwarded]
    assert cookies == [cookie_of(alice).headers["cookie"], cookie_of(bob).headers["cookie"], None]
