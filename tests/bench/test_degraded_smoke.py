"""The Redis-outage benchmark (bench/degraded.py) end to end at a tiny size.

A relay, two gateways and four clients on a Redis of the run's own, 20 events/s for 1.5 s, then
3 s with Redis killed, then 1.5 s after it answers again: every client must hold every event once,
in order; both gateways must report degraded mode (`/readyz` 200 with `"degraded": true`, the
`userstream_bus_degraded` gauge 1) during the outage and be back on the bus (gauge 0) after it,
and the report must hold a latency row for each phase.
"""

import dataclasses
from pathlib import Path

import pytest

from bench import degraded
from tests.services import INGEST, PgServer

CLIENTS = 4
OPTIONS = degraded.Options(
    clients=CLIENTS, gateways=2, rate=20.0, before_s=1.5, outage_s=3.0, after_s=1.5, ingest=INGEST
)


@pytest.mark.timeout(60)
async def test_nothing_is_lost_or_doubled_and_the_gateways_report_the_outage(
    pg_server: PgServer, tmp_path: Path
) -> None:
    report = await degraded.measure(pg_server, dataclasses.replace(OPTIONS, log_dir=tmp_path))

    assert report["totals"] == {
        "missing": 0,
        "duplicated": 0,
        "out_of_order": 0,
        "unknown": 0,
        "must_refetch": 0,
    }, report["clients"]
    assert (report["exited"], report["ok"]) == ([], True)
    assert [c["received"] for c in report["clients"]] == [report["published"]] * CLIENTS
    for phase in degraded.PHASES:
        row = report["phases"][phase]
        assert row["events"] > 0 and row["deliveries"] == CLIENTS * row["events"], (phase, row)
        assert row["p99_ms"] is not None
    for view in report["gateways"]:
        outage = (view["outage_readyz"], view["outage_bus"], view["outage_degraded"])
        assert outage == (200, "unavailable", True), view
        assert view["outage_gauge"] == 1.0
        assert view["outage_degraded_events"] > 0
        assert view["after_gauge"] == 0.0
        assert view["entered_s"] is not None and view["left_s"] is not None
