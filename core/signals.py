"""Ephemeral signals (PROTOCOL.md §5): typing indicators and the like, never stored or replayed.

A `Signal` is routed like a change of the same scope (PROTOCOL.md §2, `core.channels.Routed`),
judged against each gateway's access state as it stands when the signal arrives, and sent as
`event: ephemeral` without an `id:` line (`core.frames.encode_ephemeral`), so a client's
cursor never moves for one. It travels between replicas on the bus (`sync.bus.Bus`
`publish_signal` / `signals`), at most once: never through the outbox, never kept.

`data` stays JSON text from the sender's request to the frame, as an event's does.
"""

import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

MAX_SIGNAL_DATA_BYTES = 1024
"""Largest serialized `data` of a signal a user sends, in bytes (PROTOCOL.md §5: 1 KiB)."""

MAX_SIGNAL_TYPE_CHARS = 64
"""Longest signal `type`, in characters (PROTOCOL.md §5)."""

_SIGNAL_TYPE = re.compile(r"[a-z0-9_.-]{1,64}")
_WIRE_FIELDS = ("type", "workspace_id", "stream_id", "user_id", "actor_id", "data", "at")


class InvalidSignal(ValueError):
    """A signal that cannot be sent; the message names the field, the value and the rule."""


class SignalTooLarge(InvalidSignal):
    """A signal whose serialized `data` passes the limit (answered 413, PROTOCOL.md §5)."""


@dataclass(frozen=True, slots=True)
class Signal:
    """One ephemeral signal as the bus carries it.

    `user_id`, `workspace_id`, `stream_id` are its scope (PROTOCOL.md §2: `user_id` set, only
    that user; else the readers of `stream_id` in `workspace_id`, or the workspace's active
    members); at least one of `user_id` and `workspace_id` is set. `actor_id` is the sender:
    the frame's `userId`, and the user whose own connections never receive it (None when a
    service sends it for nobody). `data` is JSON text or None; `at` the time the gateway
    accepted it, RFC 3339 UTC with milliseconds (`signal_time`).

    Raises InvalidSignal when neither `user_id` nor `workspace_id` is set.
    """

    type: str
    workspace_id: str | None
    stream_id: str | None
    user_id: str | None
    actor_id: str | None
    data: str | None
    at: str

    def __post_init__(self) -> None:
        if self.user_id is None and self.workspace_id is None:
            raise InvalidSignal("a signal needs a workspace_id or a user_id")

    def encode(self) -> bytes:
        """JSON bytes of every field, by its name (`data` as JSON text), for the bus."""
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, payload: bytes | str) -> "Signal":
        """Inverse of `encode`. Raises ValueError for a payload that is not an encoded signal
        (not JSON, a missing field, a field that is not a string or null)."""
        body = orjson.loads(payload)
        if not isinstance(body, dict):
            raise ValueError(f"not an encoded signal: {type(body).__name__}")
        try:
            values = {name: body[name] for name in _WIRE_FIELDS}
        except KeyError as exc:
            raise ValueError(f"not an encoded signal: no {exc}") from None
        for name, value in values.items():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"not an encoded signal: {name} is {type(value).__name__}")
        if not values["type"] or not values["at"]:
            raise ValueError("not an encoded signal: empty type or at")
        return cls(**values)


def check_signal_type(value: Any) -> str:
    """`value` when it is a valid signal type: 1-64 characters of `[a-z0-9_.-]`
    (PROTOCOL.md §5). Raises InvalidSignal otherwise."""
    if not isinstance(value, str) or _SIGNAL_TYPE.fullmatch(value) is None:
        raise InvalidSignal(
            f"type must be 1-{MAX_SIGNAL_TYPE_CHARS} characters of [a-z0-9_.-], got {value!r}"
        )
    return value


def signal_data_text(value: Any, max_bytes: int = MAX_SIGNAL_DATA_BYTES) -> str | None:
    """`value` as compact JSON text (orjson), or None for None. Raises InvalidSignal when it
    is not JSON-serializable, SignalTooLarge when the text passes `max_bytes` bytes."""
    if value is None:
        return None
    try:
        text = orjson.dumps(value)
    except TypeError as exc:
        raise InvalidSignal(f"data is not JSON-serializable: {exc}") from None
    if len(text) > max_bytes:
        raise SignalTooLarge(f"data is {len(text)} bytes serialized; the limit is {max_bytes}")
    return text.decode()


def signal_time(epoch_s: float | None = None) -> str:
    """RFC 3339 UTC text with milliseconds, e.g. `2026-12-05T10:00:00.123Z` (PROTOCOL.md §5),
    of `epoch_s` (seconds; now when None)."""
    moment = datetime.fromtimestamp(time.time() if epoch_s is None else epoch_s, UTC)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"
