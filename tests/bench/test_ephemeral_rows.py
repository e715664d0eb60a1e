"""The figures of the presence and signals scenarios (bench/ephemeral.py) from known inputs:
the on/off means and ratios of the connect storm, a signals step's expected and delivered
rates, the per-connection bound of presence frames and its verdict, and the merge of several
load-client processes' presence counts (bench/loadclient.py)."""

from typing import Any

import pytest

from bench.ephemeral import (
    PRESENCE_FRAME_OVERHEAD_BYTES,
    presence_bound,
    presence_env,
    presence_verdict,
    reconnect_row,
    signal_row,
    signals_summary,
    storm_summary,
)
from bench.loadclient import LoadResult, PresenceStats, merge_results
from bench.scenarios import QUICK
from core.frames import encode_presence


def presence(**fields: Any) -> dict[str, Any]:
    """sseload's `presence` object, zero unless given."""
    base = {
        "events": 0,
        "data_bytes": 0,
        "connections": 0,
        "max_per_connection": 0,
        "run_events": 0,
        "run_data_bytes": 0,
        "min_gap_ms": None,
    }
    return base | fields


def output(**fields: Any) -> dict[str, Any]:
    """One sseload stdout object of a 10-connection run, overridden by `fields`."""
    base = {
        "connections": 10,
        "ready": 10,
        "failed": 0,
        "connect": {"per_s": 500.0, "p50_ms": 3.0, "p99_ms": 9.0, "max_ms": 10.0},
        "measure_s": 4.0,
        "events": 0,
        "deliveries_per_s": 0.0,
        "latency_ms": {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0},
        "bytes": 0,
        "closed_by_server": {"healthy": 0, "slow": 0},
        "ephemeral_events": 0,
        "presence": presence(),
        "close_events": 0,
        "errors": {},
    }
    return base | fields


def histograms() -> dict[str, Any]:
    """A `--histogram-out` dump with one latency and one connect sample."""
    return {
        "first_connect_ns": 1_000_000_000,
        "last_ready_ns": 2_000_000_000,
        "latency": {"count": 1, "max_ns": 5_000_000, "buckets": [[4_980_736, 32_768, 1]]},
        "connect": {"count": 1, "max_ns": 3_000_000, "buckets": [[2_998_272, 16_384, 1]]},
    }


def storm_row(setting: str, per_s: float, p99: float, cpu: float, **extra: Any) -> dict[str, Any]:
    return {
        "presence": setting,
        "ready": 100,
        "connects_per_s": per_s,
        "connect_p50_ms": p99 / 2,
        "connect_p99_ms": p99,
        "server_cpu_ms_per_conn": cpu,
        **extra,
    }


def test_storm_summary_averages_each_setting_and_divides_on_by_off() -> None:
    rows = [
        storm_row("off", 1000.0, 100.0, 0.8),
        storm_row("on", 950.0, 120.0, 0.9),
        storm_row("off", 1200.0, 140.0, 0.6),
        storm_row("on", 1050.0, 120.0, 1.1),
        {"presence": "on", "error": "start: RuntimeError: no"},
    ]
    summary = storm_summary(rows)
    assert summary["off"]["connects_per_s"] == 1100.0
    assert summary["on"]["connects_per_s"] == 1000.0
    assert (summary["off"]["runs"], summary["on"]["runs"]) == (2, 2)
    ratio = summary["ratio_on_off"]
    assert ratio["connects_per_s"] == pytest.approx(1000 / 1100)
    assert ratio["connect_p99_ms"] == pytest.approx(1.0)
    assert ratio["server_cpu_ms_per_conn"] == pytest.approx(1.0 / 0.7)
    assert summary["within_goal"] is True


def test_storm_summary_goal_missed_and_missing_setting() -> None:
    missed = storm_summary([storm_row("off", 1000.0, 1.0, 1.0), storm_row("on", 899.0, 1.0, 1.0)])
    assert missed["within_goal"] is False
    alone = storm_summary([storm_row("off", 1000.0, 1.0, 1.0)])
    assert alone["ratio_on_off"]["connects_per_s"] is None
    assert alone["within_goal"] is None


def test_presence_env_names_the_settings() -> None:
    assert presence_env(False, QUICK) == {
        "USERSTREAM_PRESENCE": "false",
        "USERSTREAM_PRESENCE_INTERVAL_S": "1",
        "USERSTREAM_PRESENCE_GRACE_S": "2",
    }
    assert presence_env(True, QUICK)["USERSTREAM_PRESENCE"] == "true"


def test_signal_row_counts_ephemeral_frames_against_readers_minus_the_sender() -> None:
    result = LoadResult.from_json(
        output(
            events=8_000 + 12,
            ephemeral_events=8_000,
            measure_s=4.0,
            deliveries_per_s=2003.0,
            presence=presence(events=3, data_bytes=300),
        )
    )
    row = signal_row(result, readers=101, rate=20.0)
    assert row["expected_per_s"] == 2000.0
    assert row["deliveries_per_s"] == 2000.0
    assert row["presence_frames"] == 3
    assert row["presence_kib"] == (300 + 3 * PRESENCE_FRAME_OVERHEAD_BYTES) / 1024


def test_presence_bound_is_one_frame_per_interval_plus_the_first() -> None:
    assert presence_bound(4.0, 1.0) == 5
    assert presence_bound(4.5, 1.0) == 5
    assert presence_bound(3.0, 2.0) == 2


def test_frame_overhead_is_the_gateway_frame_without_its_data() -> None:
    frame = encode_presence("w1", ["u1", "u2"], ["u3"])
    data = frame.split(b"data: ", 1)[1].rstrip(b"\n")
    assert len(frame) - len(data) == PRESENCE_FRAME_OVERHEAD_BYTES


@pytest.mark.parametrize(
    ("stats", "verdict"),
    [
        (PresenceStats(10, 900, 10, 1, 10, 900, None), "ok"),
        (PresenceStats(20, 900, 10, 2, 20, 900, 990.0), "ok"),
        (PresenceStats(0, 0, 0, 0, 0, 0, None), "no presence"),
        (PresenceStats(60, 900, 10, 6, 60, 900, 1000.0), "over bound"),
        (PresenceStats(20, 900, 10, 2, 20, 900, 120.0), "too close"),
        (PresenceStats(9, 900, 9, 1, 9, 900, None), "missed"),
    ],
)
def test_presence_verdict(stats: PresenceStats, verdict: str) -> None:
    assert presence_verdict(stats, connections=10, window_s=4.0, interval_s=1.0) == verdict


def test_reconnect_row_takes_connects_from_movers_and_presence_from_watchers() -> None:
    watchers = LoadResult.from_json(
        output(
            connections=9,
            ready=9,
            measure_s=4.0,
            presence=presence(events=18, data_bytes=1800, connections=9, max_per_connection=2),
        )
    )
    movers = LoadResult.from_json(
        output(
            connections=1,
            ready=1,
            connect={"per_s": 80.0, "p50_ms": 5.0, "p99_ms": 12.0, "max_ms": 12.0},
            presence=presence(events=1, data_bytes=50),
        )
    )
    row = reconnect_row(watchers, movers, interval_s=1.0, server_cpu=0.4)
    assert (row["connections"], row["reconnects"], row["ready"]) == (9, 1, 10)
    assert (row["connects_per_s"], row["connect_p99_ms"]) == (80.0, 12.0)
    assert (row["presence_frames"], row["presence_per_conn"]) == (18, 2.0)
    assert (row["presence_bound"], row["presence_bytes_per_frame"]) == (5, 100.0)
    assert row["presence_kib"] == (1800 + 50 + 19 * PRESENCE_FRAME_OVERHEAD_BYTES) / 1024
    assert row["verdict"] == "ok"


def test_signals_summary_divides_presence_on_by_off_at_each_rate_run_with_both() -> None:
    rows = [
        {"step": "signals", "presence": "off", "rate": 100, "deliveries_per_s": 1000.0,
         "p50_ms": 2.0, "p99_ms": 10.0, "server_cpu": 0.5, "verdict": "behind"},
        {"step": "signals", "presence": "off", "rate": 20, "deliveries_per_s": 400.0,
         "p50_ms": 1.0, "p99_ms": 5.0, "server_cpu": 0.2, "verdict": "ok"},
        {"step": "signals", "presence": "on", "rate": 100, "deliveries_per_s": 900.0,
         "p50_ms": 3.0, "p99_ms": 10.0, "server_cpu": 0.6, "verdict": "behind"},
        {"step": "signals", "presence": "on", "rate": 20, "deliveries_per_s": 300.0,
         "p50_ms": 1.0, "p99_ms": 5.0, "server_cpu": 0.2, "verdict": "behind"},
        {"step": "reconnect", "presence": "on", "server_cpu": 9.0},
    ]  # fmt: skip
    summary = signals_summary(rows)
    at_100 = summary["by_rate"][100]
    assert at_100["deliveries_per_s"] == {"off": 1000.0, "on": 900.0, "ratio_on_off": 0.9}
    assert at_100["p50_ms"]["ratio_on_off"] == 1.5
    assert at_100["server_cpu"]["ratio_on_off"] == pytest.approx(1.2)
    assert summary["by_rate"][20]["deliveries_per_s"]["ratio_on_off"] == 0.75
    assert summary["max_sustained_rate"] == {"off": 20.0, "on": 0.0}


def test_merged_runs_sum_presence_and_keep_the_extremes() -> None:
    first = output(
        ephemeral_events=5,
        presence=presence(
            events=4, data_bytes=40, connections=3, max_per_connection=2, run_events=6,
            run_data_bytes=60, min_gap_ms=900.0,
        ),
    )  # fmt: skip
    second = output(
        ephemeral_events=7,
        presence=presence(
            events=3, data_bytes=30, connections=2, max_per_connection=3, run_events=3,
            run_data_bytes=30, min_gap_ms=None,
        ),
    )  # fmt: skip
    merged = merge_results([(first, histograms()), (second, histograms())])
    assert merged.ephemeral_events == 12
    assert merged.presence == PresenceStats(
        events=7,
        data_bytes=70,
        connections=5,
        max_per_connection=3,
        run_events=9,
        run_data_bytes=90,
        min_gap_ms=900.0,
    )
