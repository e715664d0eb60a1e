"""The per-user cap on open streams."""

import pytest

from gateway.limits import ConnectionLimiter


def test_acquire_refuses_past_the_limit_and_release_frees_a_slot() -> None:
    limiter = ConnectionLimiter(2)
    assert limiter.acquire("alice") and limiter.acquire("alice")
    assert not limiter.acquire("alice")
    assert limiter.acquire("bob")
    limiter.release("alice")
    assert limiter.open_streams("alice") == 1
    assert limiter.acquire("alice")


def test_release_down_to_zero_leaves_nothing_behind() -> None:
    limiter = ConnectionLimiter(1)
    limiter.acquire("alice")
    limiter.release("alice")
    limiter.release("alice")  # an extra release is harmless
    assert limiter.open_streams("alice") == 0
    assert limiter.acquire("alice")


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit must be > 0, got 0"):
        ConnectionLimiter(0)
