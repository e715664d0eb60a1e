"""The event model: outbox rows in, plain wire dicts out and back (PROTOCOL.md §1, §3)."""

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from core.events import (
    ACCESS_RESOURCE_TYPES,
    Event,
    MalformedEvent,
    format_timestamp,
    scope_error,
)
from tests.factories import COMMITTED_AT, MISSING, outbox_row


def test_from_row_reads_an_outbox_row_with_datetimes() -> None:
    event = Event.from_row(outbox_row())

    assert event == Event(
        seq=42,
        xid=1234,
        type="stream_event.created",
        resource_type="stream_event",
        action="create",
        entity_id="ev1",
        workspace_id="w1",
        stream_id="s1",
        user_id=None,
        actor_id="u1",
        data='{"text": "hello"}',
        tx='{"id": "t1", "sourceId": "tab-1"}',
        access=None,
        created_at="2026-11-20T10:00:00.123456Z",
        committed_at=COMMITTED_AT.timestamp(),
    )


def test_from_row_keeps_data_and_tx_as_the_json_text_given() -> None:
    text = '{"b": 1,   "a": [1, 2], "s": "line\\nbreak"}'
    event = Event.from_row(outbox_row(data=text, tx=None))

    assert event.data == text
    assert event.tx is None


def test_from_row_parses_the_access_after_image() -> None:
    row = outbox_row(
        type="membership.updated",
        resource_type="membership",
        action="update",
        stream_id=None,
        user_id="u2",
        access='{"row": {"workspace_id": "w1", "user_id": "u2", "status": "active"}}',
    )

    event = Event.from_row(row)

    assert event.access == {"row": {"workspace_id": "w1", "user_id": "u2", "status": "active"}}


@pytest.mark.parametrize(
    "access", [{"row": None}, b'{"row": null}', '{"row": null}'], ids=["dict", "bytes", "text"]
)
def test_from_row_accepts_access_as_object_bytes_or_text(access: Any) -> None:
    row = outbox_row(resource_type="stream", type="stream.deleted", action="delete", access=access)

    assert Event.from_row(row).access == {"row": None}


def test_from_row_accepts_formatted_created_at_and_epoch_committed_at() -> None:
    event = Event.from_row(
        outbox_row(created_at="2026-11-20T10:00:00.123456Z", committed_at=1_795_000_000.25)
    )

    assert event.created_at == "2026-11-20T10:00:00.123456Z"
    assert event.committed_at == 1_795_000_000.25


def test_from_row_treats_a_missing_commit_time_as_zero() -> None:
    assert Event.from_row(outbox_row(committed_at=None)).committed_at == 0.0
    assert Event.from_row(outbox_row(committed_at=MISSING)).committed_at == 0.0


def test_from_row_converts_created_at_to_utc() -> None:
    paris = timezone(timedelta(hours=1))
    row = outbox_row(created_at=datetime(2026, 11, 20, 11, 0, 0, 5, tzinfo=paris))

    assert Event.from_row(row).created_at == "2026-11-20T10:00:00.000005Z"


@pytest.mark.parametrize(
    "columns",
    [
        {},
        {"data": None, "tx": None, "actor_id": None},
        {
            "user_id": "u2",
            "workspace_id": None,
            "stream_id": None,
            "type": "notification.created",
            "resource_type": "notification",
        },
        {
            "type": "stream_member.deleted",
            "resource_type": "stream_member",
            "action": "delete",
            "user_id": "u2",
            "access": '{"row": null}',
        },
        {
            "type": "stream.updated",
            "resource_type": "stream",
            "action": "update",
            "access": '{"row": {"id": "s1", "visibility": "public", "tags": ["a", "b"]}}',
        },
        {"data": '"\\u2028 \\u00e9 é 😀"', "seq": 2**63 - 1, "xid": 2**40},
    ],
    ids=["full", "no-payload", "user-only", "deleted-member", "stream-update", "unicode"],
)
def test_to_wire_output_round_trips_through_from_row(columns: dict[str, Any]) -> None:
    event = Event.from_row(outbox_row(**columns))

    assert Event.from_row(event.to_wire()) == event


def test_to_wire_survives_json_serialization_as_on_the_bus() -> None:
    row = outbox_row(
        type="stream_member.created",
        resource_type="stream_member",
        user_id="u2",
        access='{"row": {"stream_id": "s1", "user_id": "u2", "left_at": null}}',
    )
    event = Event.from_row(row)

    wire = orjson.loads(orjson.dumps(event.to_wire()))

    assert Event.from_row(wire) == event


def test_to_wire_has_plain_json_types_only() -> None:
    wire = Event.from_row(outbox_row(access='{"row": null}', resource_type="stream")).to_wire()

    assert wire["access"] == '{"row":null}'
    assert wire["created_at"] == "2026-11-20T10:00:00.123456Z"
    assert isinstance(wire["committed_at"], float)
    assert all(v is None or isinstance(v, str | int | float) for v in wire.values())


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"type": MISSING}, "outbox row 42: KeyError: 'type'"),
        ({"type": ""}, "outbox row 42: type must be a non-empty string, got ''"),
        ({"resource_type": None}, "resource_type must be a non-empty string, got None"),
        ({"action": 1}, "action must be a non-empty string, got 1"),
        ({"entity_id": 99}, "entity_id must be a non-empty string, got 99"),
        ({"action": "upsert"}, r"action 'upsert' is not one of \['create', 'delete', 'update'\]"),
        ({"workspace_id": 5}, "workspace_id must be a string or null, got 5"),
        ({"stream_id": ["s1"]}, r"stream_id must be a string or null, got \['s1'\]"),
        ({"user_id": 3}, "user_id must be a string or null, got 3"),
        ({"actor_id": b"u1"}, "actor_id must be a string or null, got b'u1'"),
        ({"workspace_id": None}, "neither workspace_id nor user_id is set"),
        ({"seq": 0}, "outbox row 0: seq must be a positive integer, got 0"),
        ({"seq": -3}, "seq must be a positive integer, got -3"),
        ({"seq": "42"}, "seq must be a positive integer, got '42'"),
        ({"seq": None}, "outbox row 7: seq must be a positive integer, got None"),
        ({"seq": MISSING}, "outbox row 7: KeyError: 'seq'"),
        ({"xid": MISSING}, "KeyError: 'xid'"),
        ({"xid": "abc"}, "ValueError: invalid literal for int"),
        ({"data": {"text": "hello"}}, "data must be JSON text, got dict"),
        ({"tx": ["t1"]}, "tx must be JSON text, got list"),
        ({"access": "[1, 2]"}, r"access must be a JSON object, got \[1, 2\]"),
        ({"access": "{not json"}, "JSONDecodeError"),
        ({"created_at": 12}, "created_at must be a timestamp, got 12"),
        ({"created_at": MISSING}, "KeyError: 'created_at'"),
        ({"committed_at": "yesterday"}, "ValueError: could not convert string to float"),
    ],
)
def test_from_row_refuses_malformed_rows_naming_row_and_field(
    columns: dict[str, Any], message: str
) -> None:
    with pytest.raises(MalformedEvent, match=message):
        Event.from_row(outbox_row(**columns))


@pytest.mark.parametrize(
    ("resource_type", "columns", "missing"),
    [
        ("membership", {"user_id": None, "stream_id": None}, "user_id"),
        ("membership", {"workspace_id": None, "user_id": "u2"}, "workspace_id"),
        ("stream_member", {"user_id": None}, "user_id"),
        ("stream_member", {"stream_id": None, "user_id": "u2"}, "stream_id"),
        (
            "stream_member",
            {"workspace_id": None, "stream_id": None, "user_id": "u2"},
            "workspace_id, stream_id",
        ),
        ("stream", {"stream_id": None}, "stream_id"),
        ("stream", {"workspace_id": None, "user_id": "u2"}, "workspace_id"),
        ("workspace", {"workspace_id": None, "user_id": "u2"}, "workspace_id"),
    ],
)
def test_from_row_refuses_access_changing_events_without_their_scope_columns(
    resource_type: str, columns: dict[str, Any], missing: str
) -> None:
    row = outbox_row(resource_type=resource_type, type=f"{resource_type}.updated", **columns)

    with pytest.raises(MalformedEvent, match=f"a '{resource_type}' event must set {missing}$"):
        Event.from_row(row)


def test_malformed_event_is_a_value_error() -> None:
    assert issubclass(MalformedEvent, ValueError)


@pytest.mark.parametrize(
    ("resource_type", "columns"),
    [
        ("membership", {"workspace_id": "w1", "user_id": "u1"}),
        ("stream_member", {"workspace_id": "w1", "stream_id": "s1", "user_id": "u1"}),
        ("stream", {"workspace_id": "w1", "stream_id": "s1"}),
        ("workspace", {"workspace_id": "w1"}),
        ("stream_event", {"workspace_id": "w1"}),
        ("notification", {"user_id": "u1"}),
        ("anything_else", {"user_id": "u1", "stream_id": None}),
    ],
)
def test_scope_error_is_none_when_the_required_columns_are_set(
    resource_type: str, columns: dict[str, Any]
) -> None:
    assert scope_error(resource_type, columns) is None


def test_scope_error_requires_workspace_or_user_before_anything_else() -> None:
    problem = scope_error("membership", {"stream_id": "s1"})

    assert problem == "neither workspace_id nor user_id is set"


def test_scope_error_lists_every_missing_column_in_order() -> None:
    problem = scope_error("stream_member", {"workspace_id": "w1"})

    assert problem == "a 'stream_member' event must set stream_id, user_id"


def test_cursor_is_the_position_as_sixteen_hex_digits() -> None:
    assert Event.from_row(outbox_row(seq=42)).cursor == "000000000000002a"
    assert Event.from_row(outbox_row(seq=2**63 - 1)).cursor == "7fffffffffffffff"


@pytest.mark.parametrize(
    ("resource_type", "changes_access"),
    [
        ("workspace", True),
        ("membership", True),
        ("stream", True),
        ("stream_member", True),
        ("stream_event", False),
        ("reaction", False),
        ("notification", False),
        ("read_cursor", False),
        ("memberships", False),
    ],
)
def test_changes_access_only_for_workspace_membership_stream_and_stream_member(
    resource_type: str, changes_access: bool
) -> None:
    row = outbox_row(resource_type=resource_type, user_id="u1", type=f"{resource_type}.created")

    assert Event.from_row(row).changes_access is changes_access
    assert (resource_type in ACCESS_RESOURCE_TYPES) is changes_access


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=UTC), "2026-11-20T10:00:00.123456Z"),
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05.000000Z"),
        (
            datetime(2026, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))),
            "2025-12-31T23:30:00.000000Z",
        ),
        (
            datetime(2026, 6, 1, 12, 0, 0, 1, tzinfo=timezone(timedelta(hours=-5))),
            "2026-06-01T17:00:00.000001Z",
        ),
    ],
)
def test_format_timestamp_is_rfc3339_utc_with_microseconds(value: datetime, text: str) -> None:
    assert format_timestamp(value) == text
