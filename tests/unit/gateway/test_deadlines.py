"""Per-stream deadlines: `Deadlines.sweep` aborts writes stuck past the send timeout and
expires streams whose token expired (the responses' side: test_stream_response.py)."""

import pytest

from gateway.deadlines import SEND_TIMEOUT, Deadlines
from gateway.stream import TOKEN_EXPIRED

FAR = float("inf")


class FakeStream:
    def __init__(self, writing_since: float = 0.0, expires_at: float = FAR) -> None:
        self.writing_since = writing_since
        self.expires_at = expires_at
        self.ended: list[str] = []

    def abort(self, reason: str) -> None:
        self.ended.append(reason)

    def expire(self) -> None:
        self.ended.append(TOKEN_EXPIRED)


def test_sweep_aborts_writes_older_than_the_timeout_and_expires_expired_tokens() -> None:
    deadlines = Deadlines(send_timeout_s=10)
    idle, fresh, due, old = FakeStream(), FakeStream(95.0), FakeStream(90.0), FakeStream(1.0)
    expired, valid = FakeStream(expires_at=1000.0), FakeStream(expires_at=1000.5)
    streams = (idle, fresh, due, old, expired, valid)
    for stream in streams:
        deadlines.add(stream)
    assert deadlines.sweep(monotonic=100.0, epoch=1000.0) == 3
    assert [s.ended for s in streams] == [
        [],
        [],
        [SEND_TIMEOUT],
        [SEND_TIMEOUT],
        [TOKEN_EXPIRED],
        [],
    ]
    assert len(deadlines) == 4  # aborted streams are no longer watched; expired ones end later
    deadlines.discard(expired)
    assert deadlines.sweep(monotonic=200.0, epoch=1001.0) == 2  # `fresh` stuck, `valid` expired


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="send_timeout_s"):
        Deadlines(send_timeout_s=0)
