"""The capacity benchmark (bench/capacity.py) end to end at a tiny size.

History: 1,000 rows of each kind on a fresh database of the tests' Postgres, churned in two
rounds: every state must report the live rows and a size split that adds up, with both
history indexes. Pub/sub: a throwaway Redis, one and two subscribers, each shape for 0.3 s:
on pub/sub every frame sent must arrive, Redis must have carried events, and the CPU per
event must be fitted against the subscribers.
Decode: one timed call of each kind, each a positive number of µs.
"""

from pathlib import Path

import orjson
import pytest

from bench import capacity
from tests.services import PgServer

ROWS = 1000
OPTIONS = capacity.Options(
    rows=ROWS,
    churn_rounds=2,
    channels=100,
    subscribers=(1, 2),
    warmup_s=0.1,
    seconds=0.3,
    rounds=1,
    decode_repeat=1,
    decode_number=20,
)


@pytest.mark.timeout(60)
def test_every_part_reports_consistent_figures(pg_server: PgServer, tmp_path: Path) -> None:
    report = capacity.measure(pg_server, OPTIONS)

    assert [row["kind"] for row in report["history"]] == list(capacity.KINDS)
    for row in report["history"]:
        for state in ("loaded", "steady", "compact"):
            figures = row[state]
            assert figures["rows"] == ROWS, (row["kind"], state)
            parts = figures["bytes"]
            assert parts["total"] == sum(parts[k] for k in ("heap", "toast", "maps", "indexes"))
            assert {"outbox_user_seq", "outbox_workspace_seq"} <= set(figures["index_bytes"])
            assert figures["per_row"]["total"] > row["data_bytes"]
    chat, notification = report["history"]
    assert chat["data_bytes"] > 250
    assert 50 < notification["data_bytes"] < 100

    runs = report["pubsub"]["runs"]
    assert {(r["bus"], r["subscribers"]) for r in runs} == {
        (bus, n) for bus in capacity.BUSES for n in OPTIONS.subscribers
    }
    for run in runs:
        if run["bus"] in capacity.PUBSUB_SHAPES:
            assert run["missing_frames"] == 0, run
        assert run["published_events_per_s"] > 0 and run["redis_cpu"] >= 0, run
    assert [r["bus"] for r in report["pubsub"]["summary"]] == list(capacity.BUSES) * 2
    assert report["pubsub"]["fit"]["pubsub"] is not None
    assert len(report["pubsub"]["tick_frames"]["runs"]) == 2

    assert len(report["decode"]) == len(capacity.TICK_SIZES) + 3
    assert all(row["us"] > 0 for row in report["decode"])

    out = tmp_path / "capacity.json"
    out.write_bytes(orjson.dumps(report))
    assert orjson.loads(out.read_bytes())["options"]["rows"] == ROWS
