"""What one forward-auth call costs the gateway's process with each async HTTP client:

    .venv/bin/python -m bench.http_clients [--calls 5000] [--in-flight 50] [--repetitions 3]
                                           [--client-cpu 1] [--upstream-cpu 0] [--out F.json]

Starts the stand-in core API (`bench.auth_upstream`, no delay, pinned to `--upstream-cpu`),
pins this process to `--client-cpu` and runs on uvloop, as the gateway does. Then, for
httpx.AsyncClient and aiohttp.ClientSession in turn (alternating which goes first, for
`--repetitions` rounds): a fresh client (at most `in_flight` connections), a warm-up of
`in_flight` x 10 calls that fills its pool, then `calls` `GET /check` with a valid session as
`Authorization: Bearer`, `in_flight` at a time, each answer's body read. Measured: CPU of this
process per call (`resource.getrusage(RUSAGE_SELF)` user + system, µs) and calls per second of
wall time. Prints one line per run, the means per client and the ratio httpx/aiohttp.
"""

import argparse
import asyncio
import json
import os
import resource
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import httpx
import uvloop

from bench.auth_upstream import AuthUpstream
from bench.scenarios import parse_cpus

SECRET = "http-clients-secret"
"""HMAC key of the stand-in's sessions."""
WARMUP_PER_SLOT = 10
"""Warm-up calls per call in flight, before each measured run."""
CLIENTS = ("httpx", "aiohttp")
WIDTHS = (8, 4, 6, 7, 8, 11)
"""Column widths of the printed table."""

Call = Callable[[], Awaitable[int]]
"""One `GET /check`: its status code, once the body has been read."""


@dataclass(frozen=True)
class Run:
    """One measured run: `client`, `repetition` (from 1), `calls` made, `wall_s` seconds,
    `cpu_s` seconds of this process's CPU (user + system)."""

    client: str
    repetition: int
    calls: int
    wall_s: float
    cpu_s: float

    @property
    def calls_per_s(self) -> float:
        """Calls per second of wall time."""
        return self.calls / self.wall_s

    @property
    def cpu_us_per_call(self) -> float:
        """CPU of this process per call, µs."""
        return self.cpu_s / self.calls * 1e6


def cpu_s() -> float:
    """User + system CPU time of this process so far, seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(call: Call, calls: int, in_flight: int) -> None:
    """Make `calls` calls with `in_flight` workers each calling in turn. Raises RuntimeError
    when an answer is not 200."""
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            status = await call()
            if status != 200:
                raise RuntimeError(f"GET /check answered {status}")

    await asyncio.gather(*(worker() for _ in range(in_flight)))


async def measure(call: Call, name: str, repetition: int, calls: int, in_flight: int) -> Run:
    """Warm up with `in_flight` x `WARMUP_PER_SLOT` calls, then time `calls` calls."""
    await drive(call, in_flight * WARMUP_PER_SLOT, in_flight)
    wall0, cpu0 = time.perf_counter(), cpu_s()
    await drive(call, calls, in_flight)
    return Run(name, repetition, calls, time.perf_counter() - wall0, cpu_s() - cpu0)


async def run_httpx(
    url: str, headers: dict[str, str], repetition: int, args: argparse.Namespace
) -> Run:
    """One run with an `httpx.AsyncClient` of at most `in_flight` connections."""
    limits = httpx.Limits(max_connections=args.in_flight, max_keepalive_connections=args.in_flight)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:

        async def call() -> int:
            answer = await client.get(url, headers=headers)
            return answer.status_code

        return await measure(call, "httpx", repetition, args.calls, args.in_flight)


async def run_aiohttp(
    url: str, headers: dict[str, str], repetition: int, args: argparse.Namespace
) -> Run:
    """One run with an `aiohttp.ClientSession` of at most `in_flight` connections, used as
    gateway/forward_auth.py uses it."""
    connector = aiohttp.TCPConnector(limit=args.in_flight)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def call() -> int:
            async with session.get(url, headers=headers, allow_redirects=False) as answer:
                await answer.read()
                return answer.status

        return await measure(call, "aiohttp", repetition, args.calls, args.in_flight)


RUNNERS = {"httpx": run_httpx, "aiohttp": run_aiohttp}


def mean(runs: Sequence[Run], client: str) -> tuple[float, float]:
    """`(calls/s, CPU µs per call)` of `client`'s runs, averaged."""
    mine = [r for r in runs if r.client == client]
    return (
        sum(r.calls_per_s for r in mine) / len(mine),
        sum(r.cpu_us_per_call for r in mine) / len(mine),
    )


def report(runs: Sequence[Run], args: argparse.Namespace) -> str:
    """The runs, the means per client and the ratios httpx/aiohttp as a text table."""
    headers = ("client", "run", "calls", "wall s", "calls/s", "cpu µs/call")
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, WIDTHS, strict=True))]
    for r in runs:
        lines.append(
            f"{r.client:>8}  {r.repetition:>4}  {r.calls:>6,}  {r.wall_s:>7.2f}"
            f"  {r.calls_per_s:>8,.0f}  {r.cpu_us_per_call:>11,.0f}"
        )
    means = {client: mean(runs, client) for client in CLIENTS}
    for client, (per_s, cpu) in means.items():
        lines.append(f"{client:>8}  {'mean':>4}  {'':>6}  {'':>7}  {per_s:>8,.0f}  {cpu:>11,.0f}")
    (httpx_rate, httpx_cpu), (aiohttp_rate, aiohttp_cpu) = means["httpx"], means["aiohttp"]
    lines.append(
        f"httpx/aiohttp: CPU per call x{httpx_cpu / aiohttp_cpu:.2f}, calls/s"
        f" x{httpx_rate / aiohttp_rate:.2f} ({args.calls:,} calls, {args.in_flight} in flight,"
        f" {args.repetitions} alternating repetitions; this process on cpu {args.client_cpu},"
        f" the stand-in on cpu {args.upstream_cpu})"
    )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[Run]:
    """Start the stand-in, then run both clients `repetitions` times, alternating."""
    runs: list[Run] = []
    async with AuthUpstream(SECRET, delay_ms=0, cpu=args.upstream_cpu) as upstream:
        headers = {"Authorization": f"Bearer {upstream.session('u1')}"}
        for repetition in range(1, args.repetitions + 1):
            order = CLIENTS if repetition % 2 else CLIENTS[::-1]
            for client in order:
                result = await RUNNERS[client](upstream.check_url, headers, repetition, args)
                print(
                    f"  {client} run {repetition}: {result.calls_per_s:,.0f} calls/s,"
                    f" {result.cpu_us_per_call:,.0f} µs CPU per call",
                    flush=True,
                )
                runs.append(result)
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line (module docstring), pin this process, run, print."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_clients", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--calls", type=int, default=5000, help="measured calls per run")
    parser.add_argument("--in-flight", type=int, default=50, help="calls at once")
    parser.add_argument("--repetitions", type=int, default=3, help="runs of each client")
    parser.add_argument("--client-cpu", default="1", help="cpu of this process")
    parser.add_argument("--upstream-cpu", default="0", help="taskset -c list of the stand-in")
    parser.add_argument("--out", type=Path, help="also write the runs as JSON here")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, parse_cpus(args.client_cpu))
    runs = uvloop.run(run(args))
    print(report(runs, args))
    if args.out:
        document = {
            "options": {k: str(v) for k, v in vars(args).items()},
            "runs": [
                asdict(r) | {"calls_per_s": r.calls_per_s, "cpu_us_per_call": r.cpu_us_per_call}
                for r in runs
            ],
        }
        args.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
