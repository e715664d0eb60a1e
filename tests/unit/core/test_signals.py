"""Ephemeral signals (PROTOCOL.md §5): their checks, their bus form, their routing by §2."""

import pytest

from core.access import AccessState, StreamInfo, UserAccess, can_receive, workspace_of_stream
from core.channels import channel_for
from core.signals import (
    InvalidSignal,
    Signal,
    SignalTooLarge,
    check_signal_type,
    signal_data_text,
    signal_time,
)
from tests.signal_readers import make_signal


@pytest.mark.parametrize("value", ["typing", "a", "t" * 64, "read.receipt", "x_1-2.y", "0"])
def test_signal_types_of_1_to_64_allowed_characters_pass(value: str) -> None:
    assert check_signal_type(value) == value


@pytest.mark.parametrize("value", ["", "t" * 65, "Typing", "typing!", "é", "a b", None, 3])
def test_other_signal_types_are_refused(value: object) -> None:
    with pytest.raises(InvalidSignal, match=r"1-64 characters of \[a-z0-9_.-\]"):
        check_signal_type(value)


def test_data_up_to_1024_serialized_bytes_passes_and_1025_is_too_large() -> None:
    assert signal_data_text("x" * 1022) == '"' + "x" * 1022 + '"'
    assert signal_data_text({"a": [1, None]}) == '{"a":[1,null]}'
    assert signal_data_text(None) is None
    with pytest.raises(SignalTooLarge, match="data is 1025 bytes serialized; the limit is 1024"):
        signal_data_text("x" * 1023)
    with pytest.raises(SignalTooLarge):
        signal_data_text("é" * 512)  # 1024 bytes of UTF-8 and two quotes


def test_data_that_is_not_json_is_refused() -> None:
    with pytest.raises(InvalidSignal, match="not JSON-serializable"):
        signal_data_text({1, 2})


def test_a_signal_needs_a_workspace_or_a_user() -> None:
    with pytest.raises(InvalidSignal, match="workspace_id or a user_id"):
        make_signal(workspace_id=None, user_id=None)
    assert make_signal(workspace_id=None, stream_id=None, user_id="u2").user_id == "u2"


def test_a_signal_decodes_to_what_was_encoded() -> None:
    signal = make_signal(user_id="u2", data='{"text":"a\\nb"}')
    assert Signal.decode(signal.encode()) == signal
    assert Signal.decode(make_signal(data=None, actor_id=None).encode()).data is None


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"[]", "list"),
        (b'{"type": "typing"}', "no 'workspace_id'"),
        (make_signal().encode().replace(b'"actor_id":"u1"', b'"actor_id":7'), "actor_id is int"),
        (make_signal().encode().replace(b'"type":"typing"', b'"type":""'), "empty"),
    ],
)
def test_foreign_payloads_do_not_decode(payload: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Signal.decode(payload)


def test_signal_time_is_utc_with_milliseconds() -> None:
    assert signal_time(1_796_464_800.1234) == "2026-12-05T10:00:00.123Z"
    assert signal_time().endswith("Z")


def state() -> AccessState:
    """w1 (alice active, carol invited) with public `general`, private `secret` (alice) and
    the thread `t1` of `secret`, inheriting; w2 (alice active) with `other`."""
    streams = {
        "general": StreamInfo("general", "w1", "public", None),
        "secret": StreamInfo("secret", "w1", "private", None),
        "t1": StreamInfo("t1", "w1", "inherit", "secret"),
    }
    return AccessState(
        users={
            "alice": UserAccess("alice", {"w1": "active", "w2": "active"}, {"secret"}),
            "bob": UserAccess("bob", {"w1": "active"}),
            "carol": UserAccess("carol", {"w1": "invited"}),
        },
        streams={"w1": streams, "w2": {"other": StreamInfo("other", "w2", "public", None)}},
    )


@pytest.mark.parametrize(
    ("user", "stream", "allowed"),
    [
        ("alice", "t1", True),
        ("bob", "general", True),
        ("bob", "t1", False),
        ("bob", "secret", False),
        ("carol", "general", False),
        ("nobody", "general", False),
    ],
)
def test_a_stream_signal_reaches_whom_a_change_of_that_stream_would(
    user: str, stream: str, allowed: bool
) -> None:
    signal = make_signal(stream_id=stream)
    assert can_receive(state(), user, signal) is allowed
    assert channel_for(signal) == "workspace:w1"


def test_workspace_and_user_signals_follow_rules_3_and_1() -> None:
    workspace = make_signal(stream_id=None)
    personal = make_signal(user_id="carol", stream_id=None)
    assert [can_receive(state(), u, workspace) for u in ("alice", "bob", "carol")] == [
        True,
        True,
        False,
    ]
    assert [can_receive(state(), u, personal) for u in ("alice", "bob", "carol")] == [
        False,
        False,
        True,
    ]
    assert channel_for(personal) == "user:carol"


def test_the_workspace_of_a_stream_is_found_among_the_senders_active_workspaces() -> None:
    assert workspace_of_stream(state(), "alice", "other") == "w2"
    assert workspace_of_stream(state(), "alice", "secret") == "w1"  # readable or not: found
    assert workspace_of_stream(state(), "bob", "other") is None  # not in bob's workspaces
    assert workspace_of_stream(state(), "carol", "general") is None  # invited only
    assert workspace_of_stream(state(), "alice", "missing") is None
    assert workspace_of_stream(state(), "nobody", "general") is None
