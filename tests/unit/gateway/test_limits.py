"""The per-user cap on open streams."""

import pytest

from gateway.limits import ConnectionLimiter, TokenBuckets, retry_after_s


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


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_gives_its_burst_then_one_token_per_refill_interval() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=8, burst=3, clock=clock)  # binary fractions: exact

    assert [buckets.take("alice") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("alice") == 0.125
    assert buckets.take("bob") == 0.0  # one bucket per user
    clock.now += 0.0625
    assert buckets.take("alice") == 0.0625  # half a token there
    clock.now += 0.0625
    assert buckets.take("alice") == 0.0
    assert buckets.take("alice") == 0.125


def test_a_bucket_never_holds_more_than_its_burst() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=10, burst=2, clock=clock)
    buckets.take("alice")
    clock.now += 3600

    assert [buckets.take("alice") > 0 for _ in range(3)] == [False, False, True]


def test_prune_forgets_only_buckets_that_are_full_again() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate_per_s=1, burst=2, clock=clock)
    buckets.take("alice")
    clock.now += 0.5
    buckets.take("bob")
    clock.now += 0.6  # alice full again (1.1 tokens regained), bob not (0.6)

    buckets.prune()

    assert len(buckets) == 1
    assert buckets.take("bob") == 0.0
    assert buckets.take("bob") > 0  # bob's bucket was kept: 1.6 tokens, not 2


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert retry_after_s(0.01) == 1
    assert retry_after_s(1.0) == 1
    assert retry_after_s(1.2) == 2


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [(0, 1, "rate_per_s must be > 0, got 0"), (1, 0, "burst must be >= 1, got 0")],
)
def test_bucket_bounds_are_checked(rate: float, burst: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBuckets(rate, burst)
