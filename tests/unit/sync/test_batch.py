"""`Batch`: the unit the bus carries (sync/bus.py): its rules and its wire form."""

import orjson
import pytest

from core.events import MalformedEvent
from sync.bus import Batch
from tests.factories import event_at


def test_batch_last_is_the_position_of_its_last_event() -> None:
    assert Batch(3, (event_at(4), event_at(5), event_at(9))).last == 9


def test_batch_needs_at_least_one_event() -> None:
    with pytest.raises(ValueError, match="a batch needs at least one event"):
        Batch(0, ())


@pytest.mark.parametrize("positions", [(5, 4), (4, 4), (2, 6, 5)])
def test_batch_refuses_events_not_in_increasing_position_order(positions: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"batch positions \[.*\] \(prev 0\) are not increasing"):
        Batch(0, tuple(event_at(p) for p in positions))


@pytest.mark.parametrize("prev", [4, 5])
def test_batch_refuses_prev_at_or_past_its_first_position(prev: int) -> None:
    with pytest.raises(ValueError, match=rf"batch positions \[4, 6\] \(prev {prev}\)"):
        Batch(prev, (event_at(4), event_at(6)))


def test_batch_accepts_a_gap_between_prev_and_its_first_position() -> None:
    assert Batch(1, (event_at(10),)).prev == 1


def test_encode_then_decode_gives_an_equal_batch() -> None:
    access_event = event_at(
        8,
        type="membership.created",
        resource_type="membership",
        entity_id="m-1",
        stream_id=None,
        user_id="u-2",
        data=None,
        tx=None,
        access={"row": {"user_id": "u-2", "role": "member", "status": "active"}},
    )
    batch = Batch(2, (event_at(3), event_at(5), access_event))

    decoded = Batch.decode(batch.encode())

    assert decoded == batch
    assert decoded.events[2].access == {
        "row": {"user_id": "u-2", "role": "member", "status": "active"}
    }


def test_decode_accepts_the_encoding_as_text() -> None:
    batch = Batch(0, (event_at(1),))

    assert Batch.decode(batch.encode().decode()) == batch


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe",
        b"null",
        b"[]",
        b"{}",
        b'{"prev": 0}',
        b'{"prev": 0, "events": 5}',
        b'{"prev": 0, "events": [5]}',
        b'{"prev": "x", "events": []}',
        b'{"prev": 0, "events": []}',
    ],
)
def test_decode_raises_value_error_for_a_foreign_payload(payload: bytes) -> None:
    with pytest.raises(ValueError):
        Batch.decode(payload)


def test_decode_raises_malformed_event_for_an_invalid_event() -> None:
    wire = event_at(1).to_wire() | {"action": "upsert"}

    with pytest.raises(MalformedEvent, match="action 'upsert' is not one of"):
        Batch.decode(orjson.dumps({"prev": 0, "events": [wire]}))


def test_decode_refuses_a_payload_that_breaks_batch_rules() -> None:
    wires = [event_at(2).to_wire(), event_at(1).to_wire()]

    with pytest.raises(ValueError, match="are not increasing"):
        Batch.decode(orjson.dumps({"prev": 0, "events": wires}))
