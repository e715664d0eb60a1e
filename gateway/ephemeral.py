"""`POST /me/ephemeral`: a user sends an ephemeral signal (PROTOCOL.md §5), e.g. typing.

The request carries the user's credentials exactly as `GET /me/stream` does (PROTOCOL.md §3:
Bearer, then the `userstream_token` cookie, then `access_token`; `gateway.auth`) and a JSON
body `{"type": "typing", "streamId": "s1", "data": {...}}`, with `workspaceId` instead of
`streamId` for a workspace-wide signal. Checked in this order, each answer an RFC 9457 problem:
- 401 (`WWW-Authenticate: Bearer`): no valid credentials;
- 429 with `Retry-After` (whole seconds): past the user's token bucket in this process,
  `USERSTREAM_EPHEMERAL_RATE` a second, `USERSTREAM_EPHEMERAL_BURST` at once
  (`gateway.limits.TokenBuckets`); refused requests of any kind take their token too;
- 413: a body over `MAX_BODY_BYTES`, or `data` over 1 KiB (1024 bytes) serialized;
- 400: not a JSON object, an unknown member, a `type` that is not 1-64 characters of
  `[a-z0-9_.-]`, not exactly one of `streamId` / `workspaceId` as a non-empty string;
- 403: the user may not read that stream, or is not an active member of that workspace,
  judged by PROTOCOL.md §2 against this gateway's access state as of now (`sync.senders`
  loads the sender's access when no stream of theirs is open here); a stream is looked for
  among the workspaces where the user is active;
- 503 with `Retry-After`: Postgres failed while the sender's access was being loaded;
- 202 `{"accepted": 1, "at": "<RFC 3339>"}`: handed to the bus, which carries it to every
  replica (`sync.signals` delivers it there). If the bus is down the signal is lost and the
  answer is still 202: signals are at most once (PROTOCOL.md §5, not part of §4), and a lost
  one is counted in `userstream_signals_lost_total`.

Every refusal counts in `userstream_signals_refused_total{reason}`, every 202 in
`userstream_signals_received_total` (`sync.metrics`).
"""

import logging
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from core.access import can_receive, workspace_of_stream
from core.signals import (
    InvalidSignal,
    Signal,
    SignalTooLarge,
    check_signal_type,
    signal_data_text,
    signal_time,
)
from gateway.auth import AuthError, AuthUnavailable, Principal
from gateway.limits import retry_after_s
from gateway.problems import problem
from gateway.runtime import Runtime
from sync import metrics
from sync.catchup import AccessLoadFailed
from sync.faults import SERVICE_FAULTS

logger = logging.getLogger(__name__)

PATH = "/me/ephemeral"

MAX_BODY_BYTES = 4096
"""Largest request body, bytes: 1 KiB of `data` with room for `type`, an id and JSON
punctuation; a larger body gets 413 before it is parsed."""

UNAVAILABLE_RETRY_AFTER_S = 2
"""`Retry-After` of a 503, seconds."""

_UNAVAILABLE: tuple[type[BaseException], ...] = (*SERVICE_FAULTS, AccessLoadFailed)
"""What loading a sender's access raises when Postgres fails (answered 503)."""

_MEMBERS = frozenset({"type", "streamId", "workspaceId", "data"})


class Refused(Exception):
    """Ends a request early with a problem `response`, counted under `reason`."""

    def __init__(self, reason: str, response: Response) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response


async def send_ephemeral(request: Request) -> Response:
    """`POST /me/ephemeral`: see the module docstring for the request and every answer."""
    runtime: Runtime = request.app.state.runtime
    try:
        principal = await _authenticate(runtime, request)
        _take_token(runtime, principal.user_id)
        body = parse_body(await _read_body(request))
        signal = await _route(runtime, principal, body)
    except Refused as refusal:
        metrics.SIGNALS_REFUSED.labels(refusal.reason).inc()
        return refusal.response
    await send_signal(runtime, signal)
    return JSONResponse({"accepted": 1, "at": signal.at}, status_code=202)


async def send_signal(runtime: Runtime, signal: Signal) -> bool:
    """Hand an accepted signal to the bus and count it; False when the bus is down and the
    signal is lost (counted, logged at debug level: the bus logs the outage itself)."""
    metrics.SIGNALS_RECEIVED.inc()
    try:
        await runtime.bus.publish_signal(signal)
    except ConnectionError as exc:
        metrics.SIGNALS_LOST.inc()
        logger.debug("signal %r lost: %s", signal.type, exc)
        return False
    return True


async def _authenticate(runtime: Runtime, request: Request) -> Principal:
    try:
        return await runtime.auth.authenticate(request)
    except AuthUnavailable as exc:
        raise Refused("unavailable", problem(503, str(exc), headers=exc.headers)) from None
    except AuthError as exc:
        raise Refused("unauthorized", problem(401, str(exc), headers=exc.headers)) from None


def _take_token(runtime: Runtime, user_id: str) -> None:
    wait_s = runtime.signal_limiter.take(user_id)
    if wait_s > 0:
        settings = runtime.settings
        detail = (
            f"user {user_id!r} sent more than {settings.ephemeral_burst} signals at once or"
            f" {settings.ephemeral_rate:g} a second"
        )
        headers = {"Retry-After": str(retry_after_s(wait_s))}
        raise Refused("rate_limited", problem(429, detail, headers=headers))


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        detail = f"the body is {declared} bytes; the limit is {MAX_BODY_BYTES} bytes"
        raise Refused("too_large", problem(413, detail))
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                detail = f"the body passed the limit of {MAX_BODY_BYTES} bytes"
                raise Refused("too_large", problem(413, detail))
            chunks.append(chunk)
    except ClientDisconnect:
        detail = "the client went away before sending the whole body"
        raise Refused("bad_request", problem(400, detail)) from None
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class SignalRequest:
    """A checked request body: `type`, exactly one of `stream_id` and `workspace_id`, and
    `data` as JSON text (None for null or absent)."""

    type: str
    stream_id: str | None
    workspace_id: str | None
    data: str | None


def parse_body(body: bytes) -> SignalRequest:
    """The checked request of a body (see the module docstring). Raises `Refused`: 400
    (`bad_request`) for a malformed body, 413 (`too_large`) for `data` over 1 KiB."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Refused("bad_request", problem(400, f"the body is not JSON: {exc}")) from None
    try:
        return _check(document)
    except SignalTooLarge as exc:
        raise Refused("too_large", problem(413, str(exc))) from None
    except InvalidSignal as exc:
        raise Refused("bad_request", problem(400, str(exc))) from None


def _check(document: Any) -> SignalRequest:
    if not isinstance(document, dict):
        raise InvalidSignal(f"the body must be a JSON object, got {type(document).__name__}")
    unknown = sorted(set(document) - _MEMBERS)
    if unknown:
        raise InvalidSignal(f"unknown members {unknown}; a signal has {sorted(_MEMBERS)}")
    scopes = [name for name in ("streamId", "workspaceId") if document.get(name) is not None]
    if len(scopes) != 1:
        raise InvalidSignal("send exactly one of streamId and workspaceId")
    scope = document[scopes[0]]
    if not isinstance(scope, str) or not scope:
        raise InvalidSignal(f"{scopes[0]} must be a non-empty string, got {scope!r}")
    return SignalRequest(
        type=check_signal_type(document.get("type")),
        stream_id=document.get("streamId"),
        workspace_id=document.get("workspaceId"),
        data=signal_data_text(document.get("data")),
    )


async def _route(runtime: Runtime, principal: Principal, body: SignalRequest) -> Signal:
    """The signal of an accepted body; Refused with 403 when PROTOCOL.md §2 would not let the
    sender read its scope now, 503 when the sender's access cannot be loaded."""
    user_id = principal.user_id
    try:
        state = await runtime.senders.state_for(user_id)
    except _UNAVAILABLE as exc:
        logger.warning("access of signal sender %s not loaded: %r", user_id, exc)
        headers = {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)}
        detail = f"the access of user {user_id!r} could not be loaded; retry later"
        raise Refused("unavailable", problem(503, detail, headers=headers)) from None
    stream_id, workspace_id = body.stream_id, body.workspace_id
    if stream_id is not None:
        workspace_id = workspace_of_stream(state, user_id, stream_id)
    signal = None
    if workspace_id is not None:
        signal = Signal(
            type=body.type,
            workspace_id=workspace_id,
            stream_id=stream_id,
            user_id=None,
            actor_id=user_id,
            data=body.data,
            at=signal_time(),
        )
    if signal is None or not can_receive(state, user_id, signal, admin=principal.admin):
        where = f"stream {stream_id!r}" if stream_id is not None else f"workspace {workspace_id!r}"
        detail = f"user {user_id!r} may not send signals to {where}"
        raise Refused("forbidden", problem(403, detail, title="Forbidden"))
    return signal
