"""SSE frames: exact bytes of the wire format (PROTOCOL.md §3), read back as a client would."""

import dataclasses
import re
from typing import Any

import orjson
import pytest

from core.frames import (
    PING,
    change_payload,
    encode_change,
    encode_close,
    encode_ephemeral,
    encode_must_refetch,
    encode_offset,
    encode_presence,
    encode_retry,
)
from tests.factories import make_event
from tests.signal_readers import make_signal

EVENT = make_event(data='{"text": "hello", "n": 1}', committed_at=1_795_000_000.5)
"""Position 42, `stream_event.created` of `ev1` in w1/s1 by u1 (`tests.factories.outbox_row`)."""


def parse_sse(stream: bytes) -> list[dict[str, Any]]:
    """Messages and comments of an SSE byte stream, per WHATWG HTML §9.2.6 (minus BOM handling).

    Each message is a dict of the fields it set (`event`, `id`, `retry`, and `data` joined by
    newlines); each comment is `{"comment": text}`.
    """
    messages: list[dict[str, Any]] = []
    fields: dict[str, Any] = {}
    for line in re.split(r"\r\n|\r|\n", stream.decode()):
        if not line:
            if fields:
                messages.append(fields)
            fields = {}
        elif line.startswith(":"):
            messages.append({"comment": line[1:].removeprefix(" ")})
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data" and "data" in fields:
                fields["data"] += "\n" + value
            else:
                fields[name] = value
    assert not fields, f"unterminated message {fields!r}"
    return messages


def test_change_frame_bytes() -> None:
    assert encode_change(EVENT) == (
        b"event: change\n"
        b"id: 000000000000002a\n"
        b'data: {"cursor":"000000000000002a","type":"stream_event.created",'
        b'"resourceType":"stream_event","action":"create","entityId":"ev1",'
        b'"workspaceId":"w1","streamId":"s1","userId":null,"actorId":"u1",'
        b'"createdAt":"2026-11-20T10:00:00.123456Z","data":{"text": "hello", "n": 1},'
        b'"tx":{"id": "t1", "sourceId": "tab-1"}}\n'
        b"\n"
    )


def test_change_payload_keys_are_camel_case_in_protocol_order() -> None:
    payload = orjson.loads(change_payload(EVENT))

    assert list(payload) == [
        "cursor",
        "type",
        "resourceType",
        "action",
        "entityId",
        "workspaceId",
        "streamId",
        "userId",
        "actorId",
        "createdAt",
        "data",
        "tx",
    ]


def test_change_frame_parses_to_the_event() -> None:
    [message] = parse_sse(encode_change(EVENT))

    assert message["event"] == "change"
    assert message["id"] == EVENT.cursor
    assert orjson.loads(message["data"]) == {
        "cursor": "000000000000002a",
        "type": "stream_event.created",
        "resourceType": "stream_event",
        "action": "create",
        "entityId": "ev1",
        "workspaceId": "w1",
        "streamId": "s1",
        "userId": None,
        "actorId": "u1",
        "createdAt": "2026-11-20T10:00:00.123456Z",
        "data": {"text": "hello", "n": 1},
        "tx": {"id": "t1", "sourceId": "tab-1"},
    }


def test_change_payload_embeds_data_and_tx_as_the_json_text_given() -> None:
    data = '{"z": 1,  "a": [1.50, "x"]}'  # key order, spacing and 1.50 kept as written
    event = dataclasses.replace(EVENT, data=data, tx='{"id": "t9"}')

    payload = change_payload(event)

    assert b'"data":{"z": 1,  "a": [1.50, "x"]},"tx":{"id": "t9"}}' in payload


@pytest.mark.parametrize("data", ['"just a string"', "17", "[]", "null", "true"])
def test_change_payload_embeds_any_json_value_as_data(data: str) -> None:
    payload = orjson.loads(change_payload(dataclasses.replace(EVENT, data=data)))

    assert payload["data"] == orjson.loads(data)


def test_change_payload_has_null_data_and_tx_when_the_row_has_none() -> None:
    event = dataclasses.replace(EVENT, data=None, tx=None)

    assert change_payload(event).endswith(b',"data":null,"tx":null}')


def test_change_payload_has_null_ids_when_unset() -> None:
    event = dataclasses.replace(
        EVENT, workspace_id=None, stream_id=None, user_id="u7", actor_id=None
    )

    payload = orjson.loads(change_payload(event))

    assert (payload["workspaceId"], payload["streamId"], payload["userId"]) == (None, None, "u7")
    assert payload["actorId"] is None


def test_a_data_string_with_newlines_stays_on_one_data_line() -> None:
    data = orjson.dumps({"text": "line one\nline two\r\nline three\rend"}).decode()
    event = dataclasses.replace(EVENT, data=data, entity_id="ev\n1")

    frame = encode_change(event)

    assert frame.count(b"\n") == 4  # event, id, data, blank line
    assert b"\r" not in frame
    [message] = parse_sse(frame)
    payload = orjson.loads(message["data"])
    assert payload["data"] == {"text": "line one\nline two\r\nline three\rend"}
    assert payload["entityId"] == "ev\n1"


def test_json_text_with_line_breaks_between_tokens_stays_on_one_data_line() -> None:
    data = '{\n  "text": "a\\nb",\r\n  "list": [\r1,\n2]\n}'
    event = dataclasses.replace(EVENT, data=data, tx='{\n"id": "t1"\n}')

    frame = encode_change(event)

    [message] = parse_sse(frame)
    assert frame.count(b"\n") == 4
    payload = orjson.loads(message["data"])
    assert payload["data"] == {"text": "a\nb", "list": [1, 2]}
    assert payload["tx"] == {"id": "t1"}


def test_change_frame_is_encoded_once_and_identical_each_time() -> None:
    assert encode_change(EVENT) == encode_change(dataclasses.replace(EVENT))


def test_offset_frame_bytes() -> None:
    assert encode_offset("000000000000002a") == (
        b'event: offset\nid: 000000000000002a\ndata: {"cursor":"000000000000002a"}\n\n'
    )
    assert parse_sse(encode_offset("000000000000002a")) == [
        {"event": "offset", "id": "000000000000002a", "data": '{"cursor":"000000000000002a"}'}
    ]


def test_must_refetch_frame_bytes() -> None:
    frame = encode_must_refetch("cursor is older than the retained history")

    assert frame == (
        b'event: must-refetch\ndata: {"reason":"cursor is older than the retained history"}\n\n'
    )
    [message] = parse_sse(frame)
    assert "id" not in message


@pytest.mark.parametrize("reason", ["shutdown", "token_expired", "slow_consumer"])
def test_close_frame_bytes(reason: str) -> None:
    frame = encode_close(reason)

    assert frame == b'event: close\ndata: {"reason":"' + reason.encode() + b'"}\n\n'
    assert parse_sse(frame) == [{"event": "close", "data": f'{{"reason":"{reason}"}}'}]


def test_reasons_with_quotes_and_newlines_are_escaped_json() -> None:
    reason = 'bad "token"\nsecond line'

    [message] = parse_sse(encode_close(reason))

    assert orjson.loads(message["data"]) == {"reason": reason}


@pytest.mark.parametrize(("retry_ms", "frame"), [(0, b"retry: 0\n\n"), (2750, b"retry: 2750\n\n")])
def test_retry_frame_bytes(retry_ms: int, frame: bytes) -> None:
    assert encode_retry(retry_ms) == frame
    assert parse_sse(frame) == [{"retry": str(retry_ms)}]


def test_retry_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="retry must be >= 0 ms, got -1"):
        encode_retry(-1)


def test_ping_is_an_sse_comment() -> None:
    assert PING == b": ping\n\n"
    assert parse_sse(PING) == [{"comment": "ping"}]


def test_frames_concatenate_into_one_stream() -> None:
    stream = encode_retry(2000) + encode_offset(EVENT.cursor) + PING + encode_change(EVENT)

    kinds = [m.get("event", m.get("comment", "retry")) for m in parse_sse(stream)]

    assert kinds == ["retry", "offset", "ping", "change"]


def test_ephemeral_frame_bytes_have_no_id_line() -> None:
    signal = make_signal(data='{"active":true}', actor_id="bob")
    frame = encode_ephemeral(signal)

    assert frame == (
        b"event: ephemeral\n"
        b'data: {"type":"typing","workspaceId":"w1","streamId":"s1","userId":"bob",'
        b'"data":{"active":true},"at":"2026-12-05T10:00:00.123Z"}\n'
        b"\n"
    )
    [message] = parse_sse(frame)
    assert "id" not in message
    assert orjson.loads(message["data"])["userId"] == "bob"


def test_ephemeral_frame_of_a_signal_without_data_or_sender() -> None:
    frame = encode_ephemeral(make_signal(data=None, actor_id=None, stream_id=None))
    [message] = parse_sse(frame)
    assert orjson.loads(message["data"]) == {
        "type": "typing",
        "workspaceId": "w1",
        "streamId": None,
        "userId": None,
        "data": None,
        "at": "2026-12-05T10:00:00.123Z",
    }


def test_presence_frame_bytes_have_no_id_line() -> None:
    frame = encode_presence("w1", ("u1", "u2"), ("u3",))

    assert frame == (
        b'event: presence\ndata: {"workspaceId":"w1","online":["u1","u2"],"offline":["u3"]}\n\n'
    )
    [message] = parse_sse(frame)
    assert "id" not in message
    assert orjson.loads(encode_presence("w\n2", (), ("a\nb",)).split(b"data: ")[1]) == {
        "workspaceId": "w\n2",
        "online": [],
        "offline": ["a\nb"],
    }
