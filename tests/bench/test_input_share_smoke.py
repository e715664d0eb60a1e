"""The isolated bus-input benchmark (bench/input_share.py) end to end at a tiny size.

Eight users in two quarters, a relay, 100 events/s for 1.5 s, on the stream bus and then on the
channel bus, both on one Redis of the run's own: the reader of everything must read every
event, the quarter-0 reader some and the tick-only reader none, all in order with no gap, each
reader's CPU must be read (a positive time on a cpu), and the summary must hold a finite share.
"""

import math
from pathlib import Path

import pytest

from bench import fanout, input_share
from tests.services import INGEST, PgServer

OPTIONS = input_share.Options(
    commits_s=(0.01,),
    repeats=1,
    window_s=1.5,
    warmup_s=0.5,
    rate=100.0,
    setups=(fanout.STREAM, fanout.CHANNELS_SINGLE),
    world=fanout.World(users=8, quarters=2, workspaces=2),
    ingest=INGEST,
)


@pytest.mark.timeout(60)
async def test_each_reader_reads_its_events_in_order_and_the_share_is_a_number(
    pg_server: PgServer, tmp_path: Path
) -> None:
    runs = await input_share.measure(pg_server, OPTIONS, tmp_path)

    assert [run["setup"] for run in runs] == [fanout.STREAM, fanout.CHANNELS_SINGLE]
    stream, channels = runs
    assert set(stream["inputs"]) == {"everything"}
    assert set(channels["inputs"]) == {"quarter0", "no-topics"}
    for run in runs:
        for row in run["inputs"].values():
            assert row["disorder"] == 0 and row["gaps"] == 0, row
            assert row["cpu_per_s"] > 0, row
    everything = stream["inputs"]["everything"]["events_per_s"]
    quarter = channels["inputs"]["quarter0"]["events_per_s"]
    assert everything > 50 and 0 < quarter < everything
    assert channels["inputs"]["no-topics"]["events_per_s"] == 0
    (row,) = input_share.summarize(runs)
    assert row["setup"] == fanout.CHANNELS_SINGLE and row["commit_ms"] == 10
    assert math.isfinite(row["share"]) and row["share"] > 0
    assert row["disorder"] == 0 and row["gaps"] == 0
