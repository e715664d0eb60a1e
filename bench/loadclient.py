"""Python side of the C load client `bench/client/sseload`.

`build()` compiles it; `run_load()` runs one sseload process (pinned with `taskset`) and parses
its JSON result into a `LoadResult`; with `processes` > 1 it spreads more connections than one
process may open (the machine's limit is 20,000 files per process) across several processes
and merges their results exactly from the raw histogram buckets each one dumps.

What sseload measures (bench/client/sseload.c has the details): connect time from `connect()` to
the ready marker; then, over the measure phase, SSE events received per second and the latency
`receive time - ts` of every event whose data carries `"ts":<ns since the epoch>` (the payload
`bench.targets.payload()` builds). Latencies are kept in a log-linear histogram (at most 0.4 %
error from 1 us to 100 s). `event: ephemeral` frames (PROTOCOL.md §5) count as events and also on
their own; `event: presence` frames are not events: they are counted apart (`PresenceStats`).
"""

import asyncio
import json
import logging
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

CLIENT_DIR = Path(__file__).resolve().parent / "client"
"""Sources and build output of sseload and sseserve."""

log = logging.getLogger(__name__)

_SUMMED = (
    "connections", "ready", "failed", "events", "bytes", "close_events", "ephemeral_events"
)  # fmt: skip
"""Result fields a split run sums over its processes."""


@dataclass(frozen=True)
class ConnectStats:
    """Connect phase. `per_s`: ready connections per second, from the first connect() to the last
    ready marker; `p50_ms`, `p99_ms`, `max_ms`: time from connect() to ready, per connection."""

    per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True)
class LatencyStats:
    """Event latency (receive time - `ts`) in ms over the counted window; `count` samples."""

    count: int
    p50: float
    p99: float
    max: float


@dataclass(frozen=True)
class ClosedByServer:
    """Ready connections the server ended (EOF, reset or end of the response body), split into
    healthy connections and slow consumers (`--slow-fraction`, which stop reading once ready)."""

    healthy: int
    slow: int


@dataclass(frozen=True)
class PresenceStats:
    """`event: presence` frames (PROTOCOL.md §5) received in the counted window: `events`
    frames carrying `data_bytes` bytes of data (the JSON; the frame's `event:`/`data:` lines and
    blank line add 24 bytes each on the wire), on `connections` connections, at most
    `max_per_connection` on one; `min_gap_ms`: the shortest time between two frames on the same
    connection (None when no connection had two). `run_events` and `run_data_bytes` count the
    frames of the whole run, connect phase included."""

    events: int
    data_bytes: int
    connections: int
    max_per_connection: int
    run_events: int
    run_data_bytes: int
    min_gap_ms: float | None

    @classmethod
    def merged(cls, parts: Sequence["PresenceStats"]) -> "PresenceStats":
        """Several processes' figures as one: sums, the largest maximum, the shortest gap."""
        gaps = [p.min_gap_ms for p in parts if p.min_gap_ms is not None]
        return cls(
            events=sum(p.events for p in parts),
            data_bytes=sum(p.data_bytes for p in parts),
            connections=sum(p.connections for p in parts),
            max_per_connection=max((p.max_per_connection for p in parts), default=0),
            run_events=sum(p.run_events for p in parts),
            run_data_bytes=sum(p.run_data_bytes for p in parts),
            min_gap_ms=min(gaps) if gaps else None,
        )


@dataclass(frozen=True)
class LoadResult:
    """One load run, mirroring sseload's JSON output.

    `events`, `bytes` and `latency_ms` cover the counted window: the measure phase (it starts
    once every connection is ready or failed) minus its warm-up, `measure_s` seconds long;
    `deliveries_per_s` = events / measure_s (for a split run, the sum over processes).
    `close_events` (`event: close` frames) and `closed_by_server` cover the whole run.
    `ephemeral_events`: those of `events` that were `event: ephemeral` frames; `presence`:
    the `event: presence` frames, which are not in `events`.
    `errors` counts failures by kind, e.g. `connect_ECONNREFUSED`, `http_401`,
    `connect_timeout`, `eof_before_ready`, `read_ETIMEDOUT`, `bad_chunk`.
    """

    connections: int
    ready: int
    failed: int
    connect: ConnectStats
    measure_s: float
    events: int
    deliveries_per_s: float
    latency_ms: LatencyStats
    bytes: int
    closed_by_server: ClosedByServer
    close_events: int
    errors: dict[str, int]
    ephemeral_events: int
    presence: PresenceStats

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "LoadResult":
        """Build from sseload's stdout object; raises KeyError/TypeError if a field is missing."""
        return cls(
            connections=int(obj["connections"]),
            ready=int(obj["ready"]),
            failed=int(obj["failed"]),
            connect=ConnectStats(**obj["connect"]),
            measure_s=float(obj["measure_s"]),
            events=int(obj["events"]),
            deliveries_per_s=float(obj["deliveries_per_s"]),
            latency_ms=LatencyStats(**obj["latency_ms"]),
            bytes=int(obj["bytes"]),
            closed_by_server=ClosedByServer(**obj["closed_by_server"]),
            close_events=int(obj["close_events"]),
            errors={str(k): int(v) for k, v in obj["errors"].items()},
            ephemeral_events=int(obj["ephemeral_events"]),
            presence=PresenceStats(**obj["presence"]),
        )


@dataclass(frozen=True)
class _Options:
    """sseload options shared by every process of one run."""

    cpu: str | None
    rate: float
    concurrency: int
    source_ips: Sequence[str] | None
    ready_marker: str | None
    slow_fraction: float
    duration_s: float
    warmup_s: float
    connect_timeout_s: float
    headers: Sequence[str]


@cache
def build() -> Path:
    """Compile sseload and sseserve with `make -C bench/client` (once per process) and return
    the sseload path. Raises RuntimeError carrying the compiler output when make fails."""
    done = subprocess.run(
        ["make", "-s", "-C", str(CLIENT_DIR)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"make -C {CLIENT_DIR} failed with exit status {done.returncode}:\n"
            f"{done.stdout}{done.stderr}"
        )
    return CLIENT_DIR / "sseload"


def _argv(
    binary: Path,
    host: str,
    port: int,
    paths_file: Path,
    connections: int,
    opts: _Options,
    histogram_out: Path | None,
) -> list[str]:
    argv = [] if opts.cpu is None else ["taskset", "-c", opts.cpu]
    argv += [str(binary), "--host", host, "--port", str(port), "--paths-file", str(paths_file)]
    argv += ["--connections", str(connections), "--rate", str(opts.rate)]
    argv += ["--concurrency", str(opts.concurrency), "--slow-fraction", str(opts.slow_fraction)]
    argv += ["--duration", str(opts.duration_s), "--warmup", str(opts.warmup_s)]
    argv += ["--connect-timeout", str(opts.connect_timeout_s)]
    if opts.source_ips:
        argv += ["--source-ips", ",".join(opts.source_ips)]
    if opts.ready_marker is not None:
        argv += ["--ready-marker", opts.ready_marker]
    if histogram_out is not None:
        argv += ["--histogram-out", str(histogram_out)]
    for header in opts.headers:
        argv += ["--header", header]
    return argv


async def _log_lines(stream: asyncio.StreamReader, label: str) -> list[str]:
    """Log every line of `stream`; return the last 20 for an error message."""
    tail: list[str] = []
    async for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        log.info("%s %s", label, line)
        tail = [*tail[-19:], line]
    return tail


async def _run_process(argv: list[str], label: str) -> dict[str, Any]:
    """Run one sseload; return its JSON object. Raises RuntimeError on a non-zero exit."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        stdout, tail = await asyncio.gather(proc.stdout.read(), _log_lines(proc.stderr, label))
        returncode = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if returncode != 0:
        detail = "\n".join(tail)
        raise RuntimeError(f"{label} exited with status {returncode}: {argv}\n{detail}")
    result: dict[str, Any] = json.loads(stdout)
    return result


async def _run_one(
    host: str,
    port: int,
    paths: Sequence[str],
    connections: int,
    opts: _Options,
    label: str,
    with_histogram: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One sseload process in its own temp dir: its JSON result and, if asked, its histograms."""
    binary = await asyncio.to_thread(build)
    if not paths:
        raise ValueError("paths is empty: sseload needs at least one request path")
    with tempfile.TemporaryDirectory(prefix="sseload-") as tmp:
        paths_file = Path(tmp) / "paths.txt"
        histogram_out = Path(tmp) / "histograms.json" if with_histogram else None
        await asyncio.to_thread(paths_file.write_text, "".join(f"{p}\n" for p in paths))
        argv = _argv(binary, host, port, paths_file, connections, opts, histogram_out)
        result = await _run_process(argv, label)
        histograms = None
        if histogram_out is not None:
            histograms = json.loads(await asyncio.to_thread(histogram_out.read_text))
    return result, histograms


async def run_load(
    host: str,
    port: int,
    paths: list[str],
    *,
    connections: int,
    processes: int = 1,
    cpu: str | None = "1",
    rate: float = 0,
    concurrency: int = 1000,
    source_ips: Sequence[str] | None = None,
    ready_marker: str | bytes | None = None,
    slow_fraction: float = 0.0,
    duration_s: float,
    warmup_s: float = 0.0,
    connect_timeout_s: float = 60,
    headers: Sequence[str] = (),
) -> LoadResult:
    """Run sseload against `host:port` and return its result.

    Connection i requests `paths[i % len(paths)]` (query string included). `cpu`: `taskset -c`
    list for the client, None to leave it unpinned. `rate`: connects started per second (0 = as
    fast as `concurrency`, the connects in flight, allows). `source_ips`: bind() addresses used
    round-robin, so more than ~28k connections to one port fit the ephemeral port range.
    `ready_marker`: text in the body that marks a connection subscribed (the Target's
    `ready_marker`); None = ready once the 200 response head is complete. `slow_fraction`: every
    round(1/F)-th connection stops reading once ready. The measure phase lasts `duration_s`
    seconds from the moment every connection is ready or failed (each fails after
    `connect_timeout_s`); its first `warmup_s` are not counted. `headers`: extra `K: V` lines.
    Progress lines from sseload's stderr go to this module's logger at INFO.

    `processes` > 1 spreads the connections over that many sseload processes started together
    (one may open at most ~19,900: the machine's limit of open files): process j takes a
    contiguous share and keeps its path assignment; `rate` and `concurrency` are divided
    between them; all run under the same `cpu` list. Merge: counts are summed; latency and
    connect percentiles come from the summed histogram buckets (exact, the same rule as
    sseload's own); `connect.per_s` = all ready connections over the span from the first
    connect() to the last ready marker in any process (CLOCK_MONOTONIC is shared);
    `measure_s` is the longest process window and `deliveries_per_s` the sum of the processes'
    rates (their windows start when each process finished connecting, so nearly together).

    Raises RuntimeError if sseload cannot be built or exits non-zero (bad arguments), ValueError
    if `paths` is empty or `processes` is not in 1..`connections`.
    """
    if not 1 <= processes <= connections:
        raise ValueError(f"processes must be in 1..connections ({connections}), got {processes}")
    opts = _Options(
        cpu=cpu,
        rate=rate / processes,
        concurrency=max(1, concurrency // processes),
        source_ips=tuple(source_ips) if source_ips else None,
        ready_marker=ready_marker.decode() if isinstance(ready_marker, bytes) else ready_marker,
        slow_fraction=slow_fraction,
        duration_s=duration_s,
        warmup_s=warmup_s,
        connect_timeout_s=connect_timeout_s,
        headers=tuple(headers),
    )
    if processes == 1:
        result, _ = await _run_one(host, port, paths, connections, opts, "sseload", False)
        return LoadResult.from_json(result)
    await asyncio.to_thread(build)
    shares = [connections // processes + (j < connections % processes) for j in range(processes)]
    starts = [sum(shares[:j]) for j in range(processes)]
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(
                _run_one(
                    host,
                    port,
                    [paths[(start + k) % len(paths)] for k in range(share)],
                    share,
                    opts,
                    f"sseload[{j}]",
                    True,
                )
            )
            for j, (start, share) in enumerate(zip(starts, shares, strict=True))
        ]
    return merge_results([task.result() for task in tasks])


def _quantile_ms(buckets: dict[int, tuple[int, int]], count: int, max_ns: int, pm: int) -> float:
    """sseload's `hist_quantile`: midpoint of the bucket holding rank ceil(count * pm / 10000),
    capped at the largest value. `buckets`: low_ns -> (width_ns, count)."""
    if count == 0:
        return 0.0
    rank = max(1, min(count, (count * pm + 9999) // 10000))
    seen = 0
    for low in sorted(buckets):
        width, n = buckets[low]
        seen += n
        if seen >= rank:
            return min(low + (width - 1) / 2, max_ns) / 1e6
    return max_ns / 1e6


def _merge_histograms(dumps: Sequence[dict[str, Any]]) -> tuple[dict[int, tuple[int, int]], int]:
    """Sum dumped histograms: (low_ns -> (width_ns, count), max_ns)."""
    buckets: dict[int, tuple[int, int]] = {}
    max_ns = 0
    for dump in dumps:
        max_ns = max(max_ns, int(dump["max_ns"]))
        for low, width, n in dump["buckets"]:
            buckets[low] = (width, buckets.get(low, (width, 0))[1] + n)
    return buckets, max_ns


def _merged_stats(dumps: Sequence[dict[str, Any]]) -> tuple[int, float, float, float]:
    """count, p50, p99 and max (ms) of several dumped histograms together."""
    buckets, max_ns = _merge_histograms(dumps)
    count = sum(n for _, n in buckets.values())
    p50 = _quantile_ms(buckets, count, max_ns, 5000)
    p99 = _quantile_ms(buckets, count, max_ns, 9900)
    return count, p50, p99, max_ns / 1e6


def merge_results(runs: Sequence[tuple[dict[str, Any], dict[str, Any] | None]]) -> LoadResult:
    """Merge several sseload runs given as (stdout JSON, `--histogram-out` JSON) pairs into one
    `LoadResult` (the rules are in `run_load()`). Raises ValueError without histograms."""
    if not runs or any(hist is None for _, hist in runs):
        raise ValueError("merging needs every run's --histogram-out dump")
    results = [result for result, _ in runs]
    hists = [hist for _, hist in runs if hist is not None]
    total = {key: sum(int(r[key]) for r in results) for key in _SUMMED}
    errors: dict[str, int] = {}
    for r in results:
        for kind, n in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + int(n)
    lat_count, lat_p50, lat_p99, lat_max = _merged_stats([h["latency"] for h in hists])
    _, con_p50, con_p99, con_max = _merged_stats([h["connect"] for h in hists])
    spans = [
        (int(h["first_connect_ns"]), int(h["last_ready_ns"]))
        for h, r in zip(hists, results, strict=True)
        if r["ready"]
    ]
    span_s = (max(e for _, e in spans) - min(s for s, _ in spans)) / 1e9 if spans else 0.0
    return LoadResult(
        connections=total["connections"],
        ready=total["ready"],
        failed=total["failed"],
        connect=ConnectStats(
            per_s=total["ready"] / span_s if span_s > 0 else 0.0,
            p50_ms=con_p50,
            p99_ms=con_p99,
            max_ms=con_max,
        ),
        measure_s=max(float(r["measure_s"]) for r in results),
        events=total["events"],
        deliveries_per_s=sum(float(r["deliveries_per_s"]) for r in results),
        latency_ms=LatencyStats(count=lat_count, p50=lat_p50, p99=lat_p99, max=lat_max),
        bytes=total["bytes"],
        closed_by_server=ClosedByServer(
            healthy=sum(int(r["closed_by_server"]["healthy"]) for r in results),
            slow=sum(int(r["closed_by_server"]["slow"]) for r in results),
        ),
        close_events=total["close_events"],
        errors=errors,
        ephemeral_events=total["ephemeral_events"],
        presence=PresenceStats.merged([PresenceStats(**r["presence"]) for r in results]),
    )
