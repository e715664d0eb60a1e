"""The fan-out benchmark (bench/fanout.py) end to end at a tiny size.

Eight users in two quarters (two workspaces of two users each per quarter), a relay, two loaded
gateways and one without clients, 100 events/s for 1.2 s, on the stream bus and then on the
channel bus, both on one Redis of the run's own: every stream must open and stay open, each
quarter's deliveries must follow what was published for it, the bus input readers must read
quarter 0's events (or none, or all) in order with no gap, and the summary must hold every
figure the report prints, each a finite number.
"""

import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import fanout
from tests.services import INGEST, PgServer

OPTIONS = fanout.Options(
    world=fanout.World(users=8, quarters=2, workspaces=2),
    rate=100.0,
    workspace_share=0.3,
    warmup_s=0.3,
    window_s=1.2,
    settle_s=0.5,
    rest_s=0.5,
    tail_s=1.5,
    repeats=1,
    ingest=INGEST,
    setups=(fanout.STREAM, fanout.CHANNELS_SINGLE),
    targeted_rounds=0,
)

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


def finite(value: Any) -> bool:
    """A real number that is neither infinite nor NaN."""
    return isinstance(value, int | float) and math.isfinite(value)


@pytest.mark.timeout(60)
async def test_both_buses_run_and_every_ratio_is_a_finite_number(
    pg_server: PgServer, tmp_path: Path
) -> None:
    report = await fanout.measure(pg_server, replace(OPTIONS, log_dir=tmp_path), None)

    runs = report["fanout"]["runs"]
    assert [run["setup"] for run in runs] == [fanout.STREAM, fanout.CHANNELS_SINGLE]
    for run in runs:
        assert run["exited"] == [], run
        assert run["degraded_replicas"] == 0, run
        clients = run["clients"]
        outcome = (clients["ready"], clients["failed"], clients["closed_by_server"])
        assert outcome == (8, 0, 0), (clients, run["logs"])
        assert run["published"]["events"] > 0
        assert len(run["replicas"]) == 2
        for replica in run["replicas"]:
            assert replica["connections"] == 4
            assert replica["expected_deliveries"] > 0
            assert 0.5 < replica["delivered_per_expected"] < 1.5, replica
    stream, channels = runs
    assert all(r["bus_events"] > 0 and r["received_events"] == 0 for r in stream["replicas"])
    assert all(r["received_events"] > 0 and r["topics"] > 0 for r in channels["replicas"])
    assert channels["idle"]["received_events"] == 0 and channels["idle"]["tick_bytes"] > 0
    assert stream["stream_bytes_per_s"] > 0 and stream["stream_batches_per_s"] > 0
    assert set(stream["inputs"]) == {"everything"} and set(channels["inputs"]) == {
        "quarter0",
        "no-topics",
    }
    for run in runs:
        for row in run["inputs"].values():
            assert row["disorder"] == 0 and row["gaps"] == 0, (row, run["logs"])
    assert stream["inputs"]["everything"]["events_per_s"] > 0
    assert 0.5 < channels["inputs"]["quarter0"]["read_per_expected"] < 1.5, channels["inputs"]
    assert channels["inputs"]["no-topics"]["events_per_s"] == 0

    summary = report["fanout"]["summary"]
    assert finite(summary["stream"]["delivery_cpu_per_s"])
    assert finite(summary["stream"]["deliveries_per_cpu_s"])
    figures = summary["channels"][fanout.CHANNELS_SINGLE]
    for key in (
        "bus_input_cpu_per_s",
        "bus_input_share",
        "ticks_only_share",
        "received_events_ratio",
        "received_bytes_ratio",
        "deliveries_per_cpu_s_ratio",
        "net_bus_input_share",
        "net_ticks_only_share",
    ):
        assert finite(figures[key]), (key, figures)
    assert all(finite(v) for v in figures["bus_input_share_per_repeat"])
    inputs = figures["input_readers"]
    assert finite(inputs["everything_cpu_per_s"]) and finite(inputs["quarter_cpu_per_s"]), inputs
    if inputs["everything_cpu_per_s"] > 0:  # a tiny run may not reach one clock tick of CPU
        assert finite(inputs["share"]) and finite(inputs["ticks_only_share"]), inputs
    assert 0 < figures["received_events_ratio"] <= 1
    assert figures["loaded_degraded"] == 0
