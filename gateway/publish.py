"""`POST /publish`: the outbox over HTTP, for services that cannot reach the database
(PROTOCOL.md §1, last paragraph).

A request carries `{"events": [event, ...]}`; each event is a JSON object with the fields of
`core.publish.OutboxEvent` (the outbox columns of PROTOCOL.md §1): `type`, `resource_type`,
`action`, `entity_id` required; `workspace_id`, `stream_id`, `user_id`, `actor_id`, `data`,
`tx` optional. Every event is checked by the SDK's own `OutboxEvent.validate` before anything
is written; then all of them are inserted by `publish_many` in one transaction, so they commit
together, in the order given, with consecutive cursors.

An event with the extra member `"ephemeral": true` is an ephemeral signal instead (PROTOCOL.md
§5): validated the same way (the §1 fields, `data` up to 64 KiB), written nowhere, and handed to
the bus once the other events of the request have committed (at once when there are none),
to reach every connection §2 routes it to on every replica, except those of its `actor_id`
(the sender, the frame's `userId`); with `user_id` set, that user's connections only (rule 1).
Its frame carries `type`, the scope ids, `actor_id` and `data`; `resource_type`, `action`,
`entity_id` and `tx` are checked but not carried. Signals are at most once: one the bus cannot
carry (Redis down) is lost, and the answer is still 202.

Answers (errors are RFC 9457 problems):
- 202 `{"accepted": n, "ids": [outbox id, ...]}`: committed; relayed and delivered later.
  The ids are outbox row ids in request order, not cursors (a cursor is drawn at commit);
  an ephemeral event has `null` in its place.
- 404 without `USERSTREAM_PUBLISH_TOKEN` (the endpoint is off); 401, with
  `WWW-Authenticate: Bearer`, when `Authorization: Bearer <token>` is missing or wrong
  (`gateway.auth.static_token_refusal`, as for `/admin/status`).
- 400 for a body that is not JSON, not an object whose only member is an `events` array, or
  whose array is empty.
- 413 for a body over `publish_max_bytes` (by `Content-Length` before reading, else counted
  while reading) or more than `publish_max_events` events: both mean "split the request".
- 422 when any event is invalid (an `ephemeral` member that is not a boolean included),
  with `errors: [{"index", "detail"}]` naming each one (an RFC 9457 §3.2 extension member);
  nothing is written or sent. The SDK catches, by index, whatever Postgres would refuse that
  it can check, NUL characters included. Two cases it
  cannot check are refused by Postgres for the whole batch and get a 422 whose `errors` is
  empty (SQLSTATE classes 22 and 23): `data` with numbers Postgres prints longer than JSON
  does (jsonb keeps them as `numeric` and prints `1e300` as 301 digits) so that its printed
  form passes the 64 KiB CHECK; and a character the database encoding lacks, when that
  encoding is not UTF8.
- 503 with `Retry-After` when Postgres fails or takes over `PUBLISH_TIMEOUT_S` (no signal of
  the request is sent). If the
  failure came while committing, the events may have been written: a retry can repeat them,
  so consumers that must not see a change twice compare `entity_id` or `tx`.

Every answer counts in `userstream_publish_requests_total{status}` and every committed event
in `userstream_published_events_total` (`sync.metrics`).
"""

import asyncio
import dataclasses
import logging
from typing import Any

import asyncpg
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from core.publish import InvalidEvent, OutboxEvent, ephemeral_signal, publish_many
from core.signals import signal_time
from gateway.auth import static_token_refusal
from gateway.ephemeral import send_signal
from gateway.problems import problem
from gateway.runtime import Runtime
from sync import metrics
from sync.faults import SERVICE_FAULTS

logger = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0
"""Seconds one request may wait for a Postgres connection and its transaction; past it, 503."""

RETRY_AFTER_S = 2
"""`Retry-After` of a 503, seconds (RFC 9110 §10.2.3)."""

EPHEMERAL = "ephemeral"
"""The member that makes an event of the request an ephemeral signal (PROTOCOL.md §5)."""

_FIELDS = tuple(f.name for f in dataclasses.fields(OutboxEvent))
_REQUIRED = tuple(
    f.name
    for f in dataclasses.fields(OutboxEvent)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)
_REFUSED_DATA = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
"""Postgres errors that mean "these values cannot be stored" (SQLSTATE classes 22, 23); still
reachable after the SDK's checks, as the module docstring says (422 without indexes)."""


async def publish_events(request: Request) -> Response:
    """Validate every event of the request, then insert them all in one transaction; see the
    module docstring for the request and every answer. Counts the answer by status."""
    try:
        response = await _answer(request)
    except Exception:
        metrics.PUBLISH_REQUESTS.labels("500").inc()  # Starlette answers 500
        raise
    metrics.PUBLISH_REQUESTS.labels(str(response.status_code)).inc()
    return response


class _Refused(Exception):
    """Ends `_answer` early with `response` (a problem answer)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


async def _answer(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    refused = static_token_refusal(request, settings.publish_token, "publish")
    if refused is not None:
        return refused
    try:
        body = await _read_body(request, settings.publish_max_bytes)
        items = _decode_all(_parse(body, settings.publish_max_events))
        durable = [event for event, ephemeral in items if not ephemeral]
        inserted = iter(await _insert(runtime, durable) if durable else [])
    except _Refused as refusal:
        return refusal.response
    at = signal_time()
    for event, ephemeral in items:
        if ephemeral:
            await send_signal(runtime, ephemeral_signal(event, at))
    ids = [None if ephemeral else next(inserted) for _, ephemeral in items]
    return JSONResponse({"accepted": len(items), "ids": ids}, status_code=202)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body. Raises `_Refused` with 413 as soon as its declared or received length passes
    `max_bytes`, with 400 when the client goes away before sending it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _Refused(
            problem(413, f"the body is {declared} bytes; the limit is {max_bytes} bytes")
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _Refused(problem(413, f"the body passed the limit of {max_bytes} bytes"))
            chunks.append(chunk)
    except ClientDisconnect:
        raise _Refused(problem(400, "the client went away before sending the whole body")) from None
    return b"".join(chunks)


def _parse(body: bytes, max_events: int) -> list[Any]:
    """The `events` array of a `{"events": [...]}` body. Raises `_Refused` with 400 or 413."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Refused(problem(400, f"the body is not JSON: {exc}")) from None
    if not isinstance(document, dict) or set(document) != {"events"}:
        raise _Refused(problem(400, 'the body must be a JSON object with one member, "events"'))
    items = document["events"]
    if not isinstance(items, list):
        raise _Refused(problem(400, f'"events" must be an array, got {type(items).__name__}'))
    if not items:
        raise _Refused(problem(400, '"events" is empty; send at least one event'))
    if len(items) > max_events:
        detail = f"{len(items)} events; the limit is {max_events} per request"
        raise _Refused(problem(413, detail))
    return items


def decode_event(item: object) -> OutboxEvent:
    """An `OutboxEvent` from one JSON value of the `events` array, validated by the SDK.

    Raises InvalidEvent for a value that is not an object, a member that is not a field of
    `OutboxEvent`, a missing required field, or anything `OutboxEvent.validate` refuses (a
    `tx` that is not an object or null among them).
    """
    if not isinstance(item, dict):
        raise InvalidEvent(f"an event must be a JSON object, got {type(item).__name__}")
    unknown = sorted(set(item) - set(_FIELDS))
    if unknown:
        raise InvalidEvent(f"unknown fields {unknown}; an event has {list(_FIELDS)}")
    missing = [name for name in _REQUIRED if name not in item]
    if missing:
        raise InvalidEvent(f"missing required fields {missing}")
    event = OutboxEvent(**item)
    event.validate()
    return event


def decode_item(item: object) -> tuple[OutboxEvent, bool]:
    """One item of the `events` array: its event (`decode_event`) and whether it is
    ephemeral (the member `ephemeral`, absent: False). Raises InvalidEvent as `decode_event`
    does, and for an `ephemeral` member that is not a boolean."""
    if isinstance(item, dict) and EPHEMERAL in item:
        ephemeral = item[EPHEMERAL]
        if not isinstance(ephemeral, bool):
            raise InvalidEvent(f"{EPHEMERAL} must be true or false, got {ephemeral!r}")
        fields = {name: value for name, value in item.items() if name != EPHEMERAL}
        return decode_event(fields), ephemeral
    return decode_event(item), False


def _decode_all(items: list[Any]) -> list[tuple[OutboxEvent, bool]]:
    """Every item decoded (`decode_item`). Raises `_Refused` with a 422 naming each invalid
    one by its index (RFC 9110 §15.5.21, with the extension member `errors`)."""
    events: list[tuple[OutboxEvent, bool]] = []
    errors: list[dict[str, object]] = []
    for index, item in enumerate(items):
        try:
            events.append(decode_item(item))
        except InvalidEvent as exc:
            errors.append({"index": index, "detail": str(exc)})
    if errors:
        detail = f"{len(errors)} of {len(items)} events are invalid; nothing was published"
        raise _Refused(problem(422, detail, extensions={"errors": errors}))
    return events


async def _insert(runtime: Runtime, events: list[OutboxEvent]) -> list[int]:
    """Insert `events` in one transaction on a pooled connection; their outbox ids. Raises
    `_Refused` with 422 or 503."""
    try:
        async with (
            asyncio.timeout(PUBLISH_TIMEOUT_S),
            runtime.pool.acquire() as conn,
            conn.transaction(),
        ):
            ids = await publish_many(conn, events)
    except _REFUSED_DATA as exc:
        detail = f"Postgres refused the events; nothing was published: {exc}"
        raise _Refused(problem(422, detail, extensions={"errors": []})) from None
    except SERVICE_FAULTS as exc:
        logger.warning("publish of %d events failed: postgres unavailable: %r", len(events), exc)
        raise _Refused(
            problem(
                503,
                f"Postgres is unavailable ({type(exc).__name__}); retry later",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        ) from None
    metrics.PUBLISHED_EVENTS.inc(len(ids))
    logger.debug("published %d events, outbox ids %d to %d", len(ids), ids[0], ids[-1])
    return ids
