"""The body of `POST /me/ephemeral` (PROTOCOL.md §5): what is accepted, and every refusal."""

import orjson
import pytest

from gateway.ephemeral import Refused, SignalRequest, parse_body


def body(**members: object) -> bytes:
    return orjson.dumps(members)


def test_a_stream_signal_with_data_is_parsed() -> None:
    parsed = parse_body(body(type="typing", streamId="s1", data={"on": True}))
    assert parsed == SignalRequest("typing", "s1", None, '{"on":true}')


def test_a_workspace_signal_without_data_is_parsed() -> None:
    assert parse_body(body(type="away", workspaceId="w1")) == SignalRequest(
        "away", None, "w1", None
    )
    assert parse_body(body(type="away", workspaceId="w1", streamId=None, data=None)).data is None


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b"{", "not JSON"),
        (b'"typing"', "must be a JSON object, got str"),
        (body(type="typing", streamId="s1", extra=1), "unknown members ['extra']"),
        (body(type="Typing", streamId="s1"), "[a-z0-9_.-]"),
        (body(type="t" * 65, streamId="s1"), "1-64"),
        (body(streamId="s1"), "got None"),
        (body(type="typing"), "exactly one of streamId and workspaceId"),
        (body(type="typing", streamId="s1", workspaceId="w1"), "exactly one"),
        (body(type="typing", streamId=""), "streamId must be a non-empty string"),
        (body(type="typing", workspaceId=7), "workspaceId must be a non-empty string"),
    ],
)
def test_malformed_bodies_are_400(raw: bytes, detail: str) -> None:
    with pytest.raises(Refused) as refused:
        parse_body(raw)
    assert refused.value.reason == "bad_request"
    assert refused.value.response.status_code == 400
    assert detail in orjson.loads(refused.value.response.body)["detail"]


def test_data_over_1_kib_is_413() -> None:
    assert parse_body(body(type="typing", streamId="s1", data="x" * 1022)).data is not None
    with pytest.raises(Refused) as refused:
        parse_body(body(type="typing", streamId="s1", data="x" * 1023))
    assert refused.value.reason == "too_large"
    assert refused.value.response.status_code == 413
    assert refused.value.response.headers["content-type"] == "application/problem+json"
