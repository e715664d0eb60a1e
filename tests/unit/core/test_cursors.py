"""Cursors: fixed-width lower-case hex whose byte order is position order (PROTOCOL.md §3)."""

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.cursors import (
    CURSOR_LENGTH,
    MAX_POSITION,
    InvalidCursor,
    PrefetchSnapshot,
    StreamCursor,
    format_cursor,
    parse_cursor,
    parse_stream_cursor,
)

positions = st.integers(min_value=0, max_value=MAX_POSITION)


@pytest.mark.parametrize(
    ("position", "text"),
    [
        (0, "0000000000000000"),
        (1, "0000000000000001"),
        (42, "000000000000002a"),
        (2**32, "0000000100000000"),
        (MAX_POSITION, "7fffffffffffffff"),
    ],
)
def test_format_cursor_is_sixteen_lower_case_hex_digits(position: int, text: str) -> None:
    assert format_cursor(position) == text
    assert parse_cursor(text) == position


@pytest.mark.parametrize("position", [-1, MAX_POSITION + 1, 2**64])
def test_format_cursor_refuses_positions_outside_bigint_range(position: int) -> None:
    with pytest.raises(ValueError, match=rf"position {position} is outside 0\.\.{MAX_POSITION}"):
        format_cursor(position)


@given(positions)
def test_parse_cursor_inverts_format_cursor(position: int) -> None:
    text = format_cursor(position)
    assert len(text) == CURSOR_LENGTH
    assert text == text.lower()
    assert parse_cursor(text) == position


@given(positions, positions)
def test_byte_order_of_cursors_is_numeric_order_of_positions(a: int, b: int) -> None:
    ca, cb = format_cursor(a), format_cursor(b)
    assert (ca < cb) == (a < b)
    assert (ca == cb) == (a == b)
    assert (ca.encode() < cb.encode()) == (a < b)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2a",
        "000000000000002",  # 15 digits
        "00000000000000002a",  # 18 digits
        "000000000000002A",  # upper case
        "000000000000002g",  # not hex
        "0x0000000000002a",
        " 000000000000002a",
        "000000000000002a\n",
        "-00000000000002a",
        "+00000000000002a",
        "00000000_000002a",
        "\uff10" * 14 + "\uff12\uff41",  # full-width "000000000000002a"
        "\u0660" * 16,  # Arabic-Indic zeros: digits to `int`, not to the cursor alphabet
    ],
)
def test_parse_cursor_refuses_anything_but_sixteen_lower_case_hex_digits(text: str) -> None:
    with pytest.raises(InvalidCursor, match="expected 16 lower-case hex digits"):
        parse_cursor(text)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(None, "NoneType"), (42, "int"), (b"000000000000002a", "bytes"), (["0" * 16], "list")],
)
def test_parse_cursor_refuses_non_strings_naming_their_type(value: Any, type_name: str) -> None:
    expected = f"invalid cursor of type {type_name}: expected 16 lower-case hex digits"
    with pytest.raises(InvalidCursor, match=expected):
        parse_cursor(value)


@pytest.mark.parametrize("text", ["8000000000000000", "ffffffffffffffff"])
def test_parse_cursor_refuses_positions_beyond_bigint(text: str) -> None:
    with pytest.raises(InvalidCursor, match=f"invalid cursor '{text}': beyond the largest"):
        parse_cursor(text)


def test_invalid_cursor_message_names_the_value() -> None:
    with pytest.raises(InvalidCursor, match=r"invalid cursor 'not-a-cursor'"):
        parse_cursor("not-a-cursor")


def test_invalid_cursor_message_shortens_long_values() -> None:
    text = "a" * 1000
    with pytest.raises(InvalidCursor) as info:
        parse_cursor(text)
    assert len(str(info.value)) < 200
    assert f"'{'a' * 64}...'" in str(info.value)


def test_invalid_cursor_is_a_value_error() -> None:
    assert issubclass(InvalidCursor, ValueError)


# Prefetch cursors of wal ingest mode: a position and the prefetch's snapshot.


def test_a_snapshot_sees_what_finished_before_it_and_not_what_ran_or_came_after() -> None:
    snapshot = PrefetchSnapshot(100, 110, frozenset({103, 107}))
    assert snapshot.saw(99) and snapshot.saw(100) and snapshot.saw(105)
    assert not snapshot.saw(103) and not snapshot.saw(107)
    assert not snapshot.saw(110) and not snapshot.saw(200)


def test_stream_cursors_round_trip_plain_and_with_a_snapshot() -> None:
    assert parse_stream_cursor("000000000000002a") == StreamCursor(42)
    text = "000000000000002a-100:110:103,107"
    cursor = parse_stream_cursor(text)
    assert cursor == StreamCursor(42, PrefetchSnapshot(100, 110, frozenset({103, 107})))
    assert str(cursor) == text
    assert str(parse_stream_cursor("000000000000002a-5:5:")) == "000000000000002a-5:5:"


def test_a_snapshot_cursor_sorts_after_its_position_and_before_the_next() -> None:
    cursor = str(StreamCursor(42, PrefetchSnapshot(100, 110, frozenset({103}))))
    assert format_cursor(42) < cursor < format_cursor(43)


@pytest.mark.parametrize(
    "text",
    [
        "000000000000002a-",
        "000000000000002a-1:2",
        "000000000000002a-10:5:",  # xmin above xmax
        "000000000000002a-100:110:99",  # an xip below xmin
        "000000000000002a-100:110:110",  # an xip at xmax
        "000000000000002A-1:2:",
        "000000000000002a-1:2:x",
        "000000000000002a-1:2:" + ",".join(["1"] * 9000),  # too long
    ],
)
def test_malformed_stream_cursors_are_refused(text: str) -> None:
    with pytest.raises(InvalidCursor):
        parse_stream_cursor(text)
