"""Benchmark scenarios of what travels beside the change stream (PROTOCOL.md §5): presence and
ephemeral signals, on the userstream target only, each against a baseline of the same run.

`presence-storm`: the connect storm of `bench.scenarios.connect_storm` (`storm_connections`
connects, `storm_concurrency` in flight) with presence off, then on, `storm_rounds` times
(a fresh gateway per run, presence set by `USERSTREAM_PRESENCE`); connects/s, time to ready,
server CPU per connect, and the ratio on/off of their means (`storm_summary`; the goal is
connects/s within 10 % of presence off).

`signals`: `signals_users` connected users, all active members of workspace `w1`, and a
private stream `s2` whose members (its readers) are the first `signals_readers` of them.
Signals at the first of `signals_rates`/s go into `s2` through `POST /publish`
(`"ephemeral": true`), the
ones due every 10 ms in one request from this process (`RateDriver` with the target's
`send_signals`), each sent by one of the readers in turn (`actor_id`), whose own connection
does not receive it (PROTOCOL.md §5): expected deliveries/s = rate x (readers - 1). Latency is
the client's receive time minus the `ts` in the signal's `data`, taken just before the POST.
A rate the gateway does not sustain is followed by the next, lower one of `signals_rates`,
until one is sustained (`signals_ladder`). Run with presence off (the baseline), then on.
With presence on, the scenario then lets the first `reconnect_users` users drop and come back
at once after the grace period (`reconnect_step`), and counts the `event: presence` frames the
other connections receive.
"""

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from bench.loadclient import LoadResult, PresenceStats
from bench.scenarios import (
    STORM_COLUMNS,
    Context,
    RateDriver,
    Report,
    Row,
    ServerWatch,
    Setup,
    Sizes,
    cpu_seconds,
    drive,
    judge,
    load_row,
    mean_of,
    on_target,
    ratio_of,
    run_client,
    storm_note,
    storm_run,
    wait_measuring,
    wait_quiet,
    watch_phase,
)
from bench.targets import Target

TARGET = "userstream"
"""The only target these scenarios run on: the baselines have no presence or signals."""

STORM_GOAL = 0.90
"""presence-storm: connects/s with presence on at least 90 % of connects/s with it off."""

PRESENCE_FRAME_OVERHEAD_BYTES = len(b"event: presence\ndata: \n\n")
"""Wire bytes of a presence frame besides its data (PROTOCOL.md §5: an `event:` line, one
`data:` line and the blank line; no `id:` line), before HTTP chunk framing."""

GAP_SLACK = 0.5
"""A connection's two presence frames count as one interval apart when their receive times
are at least half an interval apart: the gateway's writes and the client's reads add jitter."""

PRESENCE_STORM_COLUMNS = [("round", "round"), ("presence", "presence"), *STORM_COLUMNS[1:]]
PRESENCE_STORM_COLUMNS.insert(-1, ("presence_frames", "presence frames"))
PRESENCE_STORM_COLUMNS.insert(-1, ("presence_mib", "presence MiB"))

SIGNALS_COLUMNS = [
    ("step", "step"),
    ("presence", "presence"),
    ("connections", "conns"),
    ("readers", "readers"),
    ("rate", "signals/s"),
    ("published_per_s", "sent/s"),
    ("expected_per_s", "expected/s"),
    ("deliveries_per_s", "deliveries/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("server_cpu", "srv cpu s/s"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("reconnects", "reconnects"),
    ("connect_p99_ms", "ready p99 ms"),
    ("presence_frames", "presence frames"),
    ("presence_per_conn", "per conn"),
    ("presence_max_per_conn", "max per conn"),
    ("presence_bound", "bound"),
    ("presence_min_gap_ms", "min gap ms"),
    ("presence_kib", "presence KiB"),
    ("verdict", "verdict"),
]


def presence_env(on: bool, sizes: Sizes) -> dict[str, str]:
    """The gateway settings of a run with presence `on` or off, with the sizes' interval and
    grace (`USERSTREAM_PRESENCE`, `..._INTERVAL_S`, `..._GRACE_S`)."""
    return {
        "USERSTREAM_PRESENCE": "true" if on else "false",
        "USERSTREAM_PRESENCE_INTERVAL_S": f"{sizes.presence_interval_s:g}",
        "USERSTREAM_PRESENCE_GRACE_S": f"{sizes.presence_grace_s:g}",
    }


def wire_bytes(frames: int, data_bytes: int) -> int:
    """Bytes of `frames` presence frames carrying `data_bytes` of data, as SSE on the wire."""
    return data_bytes + frames * PRESENCE_FRAME_OVERHEAD_BYTES


def storm_summary(rows: Sequence[Row]) -> dict[str, Any]:
    """Means of the presence-storm rows per setting (`presence` `off`/`on`; error rows and rows
    with failed connects left out) and the ratios on/off: connects/s, ready p50/p99, server CPU
    per connect. `within_goal`: connects/s on >= `STORM_GOAL` x off (None without both)."""
    summary: dict[str, Any] = {}
    keys = ("connects_per_s", "connect_p50_ms", "connect_p99_ms", "server_cpu_ms_per_conn")
    for setting in ("off", "on"):
        usable = [
            r for r in rows if r.get("presence") == setting and "error" not in r and "ready" in r
        ]
        summary[setting] = {key: mean_of(usable, key) for key in keys} | {"runs": len(usable)}
    on, off = summary["on"], summary["off"]
    summary["ratio_on_off"] = {key: ratio_of(on[key], off[key]) for key in keys}
    ratio = summary["ratio_on_off"]["connects_per_s"]
    summary["within_goal"] = None if ratio is None else ratio >= STORM_GOAL
    return summary


async def presence_storm(ctx: Context) -> Report:
    """The connect storm with presence off and on, alternating, `storm_rounds` rounds of each,
    a fresh gateway per run; the ratio on/off of the means (`storm_summary`)."""
    report = Report(PRESENCE_STORM_COLUMNS)
    sizes = ctx.sizes
    if TARGET not in ctx.targets:
        report.notes.append("userstream only; not among --targets")
        return report
    n = sizes.storm_connections
    for round_no in range(1, sizes.storm_rounds + 1):
        for on in (False, True):

            async def body(target: Target) -> list[Row]:
                row = await storm_run(ctx, target, n, sizes.storm_concurrency)
                return [row]

            setup = Setup(n, "broadcast", env=presence_env(on, sizes))
            for row in await on_target(ctx, TARGET, setup, body):
                report.rows.append({"round": round_no, "presence": "on" if on else "off", **row})
    report.summary.update(storm_summary(report.rows))
    report.notes.append(storm_note(sizes.storm_concurrency))
    report.notes.append(storm_text(report.summary, sizes))
    return report


def storm_text(summary: Mapping[str, Any], sizes: Sizes) -> str:
    """The presence-storm finding in one sentence (means and ratios of `storm_summary`)."""
    ratio = summary["ratio_on_off"]
    off, on = summary["off"], summary["on"]
    if ratio["connects_per_s"] is None:
        return "no ratio: a setting has no usable run"
    verdict = "within" if summary["within_goal"] else "NOT within"
    return (
        f"presence on/off over {on['runs']}/{off['runs']} runs (`USERSTREAM_PRESENCE`, interval"
        f" {sizes.presence_interval_s:g} s, grace {sizes.presence_grace_s:g} s): connects/s"
        f" {on['connects_per_s']:,.0f} / {off['connects_per_s']:,.0f} ="
        f" {ratio['connects_per_s']:.2f} ({verdict} {1 - STORM_GOAL:.0%} of off); ready p99"
        f" x{ratio['connect_p99_ms'] or 0:.2f}, server CPU per connect"
        f" x{ratio['server_cpu_ms_per_conn'] or 0:.2f}; `presence frames`/`MiB`: presence frames"
        " the clients received over the whole run (data bytes)"
    )


def signal_row(result: LoadResult, readers: int, rate: float) -> Row:
    """A signals step's row from the load client's result: `load_row` with deliveries/s taken
    from the `event: ephemeral` frames alone, the expected deliveries/s (rate x (readers - 1):
    the sender's own connection gets none) and the presence frames of the counted window."""
    row = load_row(result)
    measure_s = result.measure_s
    row.update(
        readers=readers,
        expected_per_s=rate * (readers - 1),
        ephemeral_events=result.ephemeral_events,
        deliveries_per_s=result.ephemeral_events / measure_s if measure_s > 0 else 0.0,
        presence_frames=result.presence.events,
        presence_kib=wire_bytes(result.presence.events, result.presence.data_bytes) / 1024,
    )
    return row


async def signals_step(
    ctx: Context, target: Target, send: Callable[..., Awaitable[None]], rate: int
) -> Row:
    """Connect `signals_users` users, wait (within the warm-up) for the gateway to go quiet,
    then send `rate` signals/s through `send` until the client's measure phase ends; the row
    of `signal_row` with the sending and server figures. A failed send (e.g. a POST answered
    after more than 10 s) stops the sending and is kept in `publish_error`; the verdict then
    ends in `, publish failed`."""
    sizes = ctx.sizes
    n, readers, warmup = sizes.signals_users, sizes.signals_readers, sizes.signals_warmup_s
    host, port = target.host_port()
    await wait_quiet(target, None, sizes.quiet_s)  # a previous step's backlog
    with watch_phase() as phase:
        load = asyncio.create_task(
            run_client(
                ctx, host, port, target.paths(n, "broadcast"), target.ready_marker,
                warmup_s=warmup, duration_s=warmup + sizes.signals_s,
            )
        )  # fmt: skip
        await wait_measuring(phase, load)
    await wait_quiet(target, load, warmup - 1.0)
    driver = RateDriver(target, "broadcast", rate, readers, sizes.signals_body_bytes, send=send)
    result, _, figures = await drive(target, driver, load, ServerWatch(target))
    row = signal_row(result, readers, rate)
    row.update(figures, rate=rate)
    row["verdict"] = judge(row, row["expected_per_s"])
    if driver.error:  # sending stopped: the gateway did not keep up with the POSTs either
        row["publish_error"] = driver.error
        row["verdict"] += ", publish failed"
    return row


def presence_bound(window_s: float, interval_s: float) -> int:
    """The most presence frames one connection may receive over `window_s` seconds for one
    workspace, at most one per `interval_s` (PROTOCOL.md §5): floor(window / interval) + 1."""
    return math.floor(window_s / interval_s) + 1


def presence_verdict(
    stats: PresenceStats, connections: int, window_s: float, interval_s: float
) -> str:
    """`ok` when every one of `connections` got a presence frame and none more than
    `presence_bound` or two closer than `GAP_SLACK` x `interval_s`; else what failed:
    `no presence` (no frame at all: presence is off or absent), `missed` (some connections got
    none), `over bound`, `too close`."""
    if stats.events == 0:
        return "no presence"
    if stats.max_per_connection > presence_bound(window_s, interval_s):
        return "over bound"
    if stats.min_gap_ms is not None and stats.min_gap_ms < GAP_SLACK * interval_s * 1e3:
        return "too close"
    if stats.connections < connections:
        return "missed"
    return "ok"


def reconnect_row(
    watchers: LoadResult, movers: LoadResult, interval_s: float, server_cpu: float
) -> Row:
    """The reconnect step's row: the reconnecting users' connects (`movers`) and the presence
    frames the connections that stayed (`watchers`) received over their counted window, with
    the per-connection bound and verdict (`presence_verdict`); `presence_kib` is every presence
    frame's wire size, the reconnected users' own included."""
    stats = watchers.presence
    window = watchers.measure_s
    total = wire_bytes(stats.events, stats.data_bytes) + wire_bytes(
        movers.presence.events, movers.presence.data_bytes
    )
    return {
        "connections": watchers.connections,
        "ready": watchers.ready + movers.ready,
        "failed": watchers.failed + movers.failed,
        "closed_healthy": watchers.closed_by_server.healthy + movers.closed_by_server.healthy,
        "reconnects": movers.connections,
        "reconnected": movers.ready,
        "connects_per_s": movers.connect.per_s,
        "connect_p50_ms": movers.connect.p50_ms,
        "connect_p99_ms": movers.connect.p99_ms,
        "measure_s": window,
        "presence_frames": stats.events,
        "presence_per_conn": stats.events / watchers.connections if watchers.connections else 0.0,
        "presence_max_per_conn": stats.max_per_connection,
        "presence_conns": stats.connections,
        "presence_bound": presence_bound(window, interval_s),
        "presence_min_gap_ms": stats.min_gap_ms,
        "presence_data_bytes": stats.data_bytes,
        "presence_bytes_per_frame": stats.data_bytes / stats.events if stats.events else None,
        "mover_presence_frames": movers.presence.events,
        "presence_kib": total / 1024,
        "server_cpu": server_cpu,
        "client_errors": {**watchers.errors, **movers.errors},
        "verdict": presence_verdict(stats, watchers.connections, window, interval_s),
    }


async def reconnect_step(ctx: Context, target: Target) -> Row:
    """After the signals step ended (every connection closed): users `reconnect_users`..N-1
    (the watchers) connect again at once, within the grace period, so they stay online; the
    first `reconnect_users` stay away until the grace period has passed and the change that
    takes them offline has been sent, then all connect at once. The watchers' counted window
    starts then and lasts about `presence_window_s` + 1 s: `reconnect_row`."""
    sizes = ctx.sizes
    m, interval = sizes.reconnect_users, sizes.presence_interval_s
    paths = target.paths(sizes.signals_users, "broadcast")
    host, port = target.host_port()
    settle = sizes.presence_grace_s + 2 * interval + 0.5
    with watch_phase() as phase:
        watching = asyncio.create_task(
            run_client(
                ctx, host, port, paths[m:], target.ready_marker,
                warmup_s=settle, duration_s=settle + 1.0 + sizes.presence_window_s,
            )
        )  # fmt: skip
        measuring = await wait_measuring(phase, watching)
    if not measuring:
        return {**load_row(await watching), "error": "the watchers ended before measuring"}
    # Their counting starts `settle` s after their measure phase began, which was at most 1 s
    # before it was seen: from now + settle, the window is open and the absent users offline.
    await asyncio.sleep(settle)
    cpu0, t0 = cpu_seconds(target.server_pids()), time.monotonic()
    movers = await run_client(
        ctx, host, port, paths[:m], target.ready_marker,
        concurrency=m, duration_s=sizes.presence_window_s,
    )  # fmt: skip
    watchers = await watching
    cpu = (cpu_seconds(target.server_pids()) - cpu0) / (time.monotonic() - t0)
    return reconnect_row(watchers, movers, interval, cpu)


async def signals_ladder(
    ctx: Context, target: Target, send: Callable[..., Awaitable[None]]
) -> list[Row]:
    """`signals_step` at each of `signals_rates` in turn until one is sustained (`judge`)."""
    rows: list[Row] = []
    for rate in ctx.sizes.signals_rates:
        rows.append(await signals_step(ctx, target, send, rate))
        if rows[-1]["verdict"] == "ok":
            break
    return rows


def max_sustained_signals(rows: Sequence[Row]) -> dict[str, float]:
    """The highest signal rate with verdict `ok` among the signals rows, per presence setting
    (0 when none was)."""
    best: dict[str, float] = {}
    for row in rows:
        if row.get("step") == "signals":
            setting = str(row.get("presence"))
            ok = row.get("verdict") == "ok"
            best[setting] = max(best.get(setting, 0.0), float(row["rate"]) if ok else 0.0)
    return best


def signals_summary(rows: Sequence[Row]) -> dict[str, Any]:
    """The signals steps' figures with presence on against off (the baseline), per rate run
    with both: deliveries/s, p50/p99 latency and server CPU, each as on, off and the ratio
    on/off; and the highest sustained rate per setting (`max_sustained_signals`)."""
    steps = [r for r in rows if r.get("step") == "signals" and "rate" in r]
    by = {(r["presence"], r["rate"]): r for r in steps}
    summary: dict[str, Any] = {"max_sustained_rate": max_sustained_signals(rows), "by_rate": {}}
    for rate in sorted({rate for _, rate in by}, reverse=True):
        off, on = by.get(("off", rate)), by.get(("on", rate))
        if off is None or on is None:
            continue
        summary["by_rate"][rate] = {
            key: {"off": off.get(key), "on": on.get(key),
                  "ratio_on_off": ratio_of(on.get(key), off.get(key))}
            for key in ("deliveries_per_s", "p50_ms", "p99_ms", "server_cpu")
        }  # fmt: skip
    return summary


async def signals(ctx: Context) -> Report:
    """Signals into a stream of `signals_readers` readers among `signals_users` connected
    members of one workspace, presence off then on (each a fresh gateway); with presence on,
    then the reconnect of `reconnect_users` users (module docstring)."""
    report = Report(SIGNALS_COLUMNS)
    sizes = ctx.sizes
    if TARGET not in ctx.targets:
        report.notes.append("userstream only; not among --targets")
        return report
    n, readers = sizes.signals_users, sizes.signals_readers
    for on in (False, True):

        async def body(target: Target, on: bool = on) -> list[Row]:
            send = getattr(target, "send_signals", None)  # userstream's, not part of Target
            if send is None:
                raise RuntimeError(f"target {target.name} cannot send signals")
            setting = "on" if on else "off"
            steps = await signals_ladder(ctx, target, send)
            rows = [{"step": "signals", "presence": setting, **row} for row in steps]
            if on:
                rows.append(
                    {"step": "reconnect", "presence": setting, **await reconnect_step(ctx, target)}
                )
            return rows

        setup = Setup(n, "broadcast", env=presence_env(on, sizes), private_readers=readers)
        report.rows += await on_target(ctx, TARGET, setup, body)
    report.summary.update(signals_summary(report.rows))
    report.notes.extend(signals_notes(sizes, report.summary))
    return report


def signals_notes(sizes: Sizes, summary: Mapping[str, Any]) -> list[str]:
    """What the signals table means, with the on/off ratios of `signals_summary`."""
    ratios = "; ".join(
        f"{rate}/s: "
        + ", ".join(
            f"{key} x{figures['ratio_on_off']:.2f}"
            for key, figures in by_key.items()
            if figures["ratio_on_off"] is not None
        )
        for rate, by_key in summary["by_rate"].items()
    )
    best = summary["max_sustained_rate"]
    return [
        f"{sizes.signals_users:,} connected users, all active members of one workspace; the"
        f" {sizes.signals_readers:,} readers are the members of a PRIVATE stream (a public"
        f" stream is read by every active member of its workspace, PROTOCOL.md §2, so all"
        f" {sizes.signals_users:,} would read it); signals of"
        f' {sizes.signals_body_bytes}-byte data through POST /publish (`"ephemeral": true`),'
        " one request per 10 ms, each signal sent by one of the readers in turn, whose own"
        " connection does not receive it: expected/s = rate x (readers - 1); deliveries/s ="
        " `event: ephemeral` frames received / counted window; latency = receive time - the"
        " `ts` put in `data` just before the POST; a rate not sustained (deliveries/s >= 95 %"
        " of expected, p99 <= 1 s, nobody dropped) is followed by the next of"
        f" {', '.join(map(str, sizes.signals_rates))}/s; highest sustained: "
        + (", ".join(f"presence {k} {v:,.0f}/s" for k, v in best.items()) or "none"),
        f"presence on/off (signals step): {ratios or 'no ratio'}; presence frames/KiB in the"
        " signals rows: those received during the counted window",
        f"reconnect (presence on, interval {sizes.presence_interval_s:g} s, grace"
        f" {sizes.presence_grace_s:g} s): {sizes.reconnect_users:,} users stay away past the"
        " grace period, then connect at once (all in flight); `presence frames` = frames the"
        f" other {sizes.signals_users - sizes.reconnect_users:,} connections received from"
        " then on (about 1 s before the reconnect plus"
        f" {sizes.presence_window_s:g} s), `bound` = floor(window / interval) + 1 per connection,"
        f" `min gap` = shortest time between two frames on one connection (ok >= {GAP_SLACK:g}"
        " interval); `presence KiB` = every presence frame's SSE bytes, the reconnected users'"
        " own included",
    ]


SCENARIOS: dict[str, Callable[[Context], Awaitable[Report]]] = {
    "presence-storm": presence_storm,
    "signals": signals,
}
"""This module's scenarios by name, run after those of `bench.scenarios`."""

COLUMNS = {"presence-storm": PRESENCE_STORM_COLUMNS, "signals": SIGNALS_COLUMNS}
"""Each scenario's columns, as it prints them."""
