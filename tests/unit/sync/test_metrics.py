"""`LoopHistogram` against prometheus-client's own `Histogram`: the same text exposition."""

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from sync.metrics import LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)
VALUES = (0.0, 0.0005, 0.001, 0.002, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 30.0)


def test_exposition_matches_prometheus_client_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = LoopHistogram("x_seconds", "Latency, seconds.", BUCKETS, registry=ours)
    reference = Histogram("x_seconds", "Latency, seconds.", buckets=BUCKETS, registry=theirs)
    for value in VALUES:
        fast.observe(value)
        reference.observe(value)
    expected = [
        line for line in generate_latest(theirs).decode().splitlines() if "_created" not in line
    ]  # `_created` (the creation time) is prometheus-client's own addition
    assert generate_latest(ours).decode().splitlines() == expected


@pytest.mark.parametrize("buckets", [(), (0.1, 0.01), (0.1, 0.1), (0.1, float("inf"))])
def test_buckets_must_increase_without_inf(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="buckets"):
        LoopHistogram("y_seconds", "y", buckets, registry=CollectorRegistry())
