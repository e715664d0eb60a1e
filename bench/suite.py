"""The benchmark suite: userstream against Nchan and a plain sse-starlette app, same client.

    .venv/bin/python -m bench.suite [SCENARIO ...] [--targets userstream,nchan,plain]
                                    [--quick] [--out bench/results.json]
                                    [--ingest wal|trigger] [--bus stream|channels]
    .venv/bin/python -m bench.suite --markdown bench/results.json    (tables of a saved run)

Scenarios (default: all, in this order): `ceiling` (the load client's own limit against the
trivial C server `bench/client/sseserve`), `idle` (RSS per connection, CPU at rest), `broadcast`
(one channel, rising rates until a target falls behind), `targeted` (one channel per user),
`connect-storm` (connects/s, time to ready), `slow` (5 % slow consumers), `scale` (userstream
with 2 gateway workers against 1), `presence-storm` (the connect storm with presence off and
on) and `signals` (ephemeral signals into one stream, then a reconnect counting presence
frames), both userstream only (bench/ephemeral.py), and `auth-storm` (the connect storm under
each authenticator: HS256, RS256 key, JWKS, forward auth cold and warm; userstream only,
bench/auth.py). `--quick` shrinks every size for a smoke run (about 1 min of measuring); the
default run takes about 16 minutes.

Ingest mode (`--ingest`, default wal; core/schema/ingest.py): the userstream target's database
is put in that mode. With wal, every target runs against a Postgres 16 with logical decoding
and durable commits started here (`bench.database.durable_logical_server`); with trigger,
against the machine's Postgres (`tests.services.postgres_server`).

Bus (`--bus`, default stream; gateway/settings.py `USERSTREAM_BUS`): the userstream target's
relay and gateway are started with that bus on the suite's one Redis: `stream` (every replica
reads one Redis Stream) or `channels` (each replica subscribes its users' topics over sharded
pub/sub, sync/bus_channels.py). The baselines do not take it.

Pinning: every server `taskset -c <--server-cpu>` (default 0); the load client `sseload`, the
publisher (this process, pinned with `sched_setaffinity`) and userstream's relay on
`--client-cpu` (default 1; the relay on `--relay-cpu` if given). Postgres and Redis are the
machine's own services, not pinned.
Each scenario prints a table; all figures go to `--out` as JSON (rewritten after every
scenario, so an interrupted run keeps what it measured).
"""

import argparse
import asyncio
import datetime
import importlib
import importlib.metadata
import inspect
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from bench import auth, ephemeral, loadclient, scenarios
from bench.database import durable_logical_server
from bench.scenarios import (
    FULL,
    IDLE_COLUMNS,
    LADDER_COLUMNS,
    QUICK,
    SLOW_COLUMNS,
    STORM_COLUMNS,
    TARGETED_COLUMNS,
    Context,
    Report,
    parse_cpus,
)
from bench.targets import Target
from bench.targets.userstream import UserstreamTarget
from core.schema.ingest import MODES, Mode
from tests.services import PgServer, postgres_server, redis_server

TARGETS = ("userstream", "nchan", "plain")
Bus = Literal["stream", "channels"]
BUSES: tuple[Bus, ...] = ("stream", "channels")
"""`--bus`: the userstream target's bus (gateway/settings.py `USERSTREAM_BUS`)."""
SCENARIOS = {**scenarios.SCENARIOS, **ephemeral.SCENARIOS, **auth.SCENARIOS}
"""Every scenario by name, in the default order."""
CLASSES = {"nchan": "NchanTarget", "plain": "PlainTarget"}


def target_factory(
    pg: PgServer,
    redis_url: str,
    relay_cpu: str,
    source: Path | None = None,
    ingest: Mode = "wal",
    bus: Bus = "stream",
) -> Any:
    """`make_target(name, env=..., private_readers=...)`: a new, not started target
    (userstream's database in ingest mode `ingest`, its processes on the bus `bus`
    (`USERSTREAM_BUS`); `env`: further settings of its processes, `private_readers`: members
    of its private stream, `UserstreamTarget`). The baselines are
    imported when first asked for, so a missing one fails only its own rows (ImportError,
    AttributeError); they take neither option (ValueError when one is given)."""

    def make_target(
        name: str, *, env: Mapping[str, str] | None = None, private_readers: int = 0
    ) -> Target:
        if name == "userstream":
            return UserstreamTarget(
                pg, redis_url, relay_cpu=relay_cpu, source=source, ingest=ingest,
                env={"USERSTREAM_BUS": bus, **(env or {})}, private_readers=private_readers,
            )  # fmt: skip
        if name not in CLASSES:
            raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
        if env or private_readers:
            raise ValueError(f"target {name!r} takes no env or private_readers (userstream only)")
        cls = getattr(importlib.import_module(f"bench.targets.{name}"), CLASSES[name])
        offered = {"redis_url": redis_url, "pg": pg}
        accepted = inspect.signature(cls).parameters
        target: Target = cls(**{k: v for k, v in offered.items() if k in accepted})
        return target

    return make_target


def cell(value: Any) -> str:
    """A table cell: thousands separators for big numbers, 1-2 decimals for small ones."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def table(report: Report) -> str:
    """The report's rows as an aligned text table; error rows print the error after the target."""
    headers = [header for _, header in report.columns]
    lines = []
    body: list[list[str]] = []
    errors: list[str] = []
    for row in report.rows:
        if "error" in row:
            errors.append(f"  {row.get('target', '?')}: ERROR {row['error']}")
        if "error" in row and "deliveries_per_s" not in row and "ready" not in row:
            continue
        body.append([cell(row.get(key)) for key, _ in report.columns])
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(headers)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body)
    lines.extend(errors)
    lines.extend(f"  note: {note}" for note in report.notes)
    return "\n".join(lines)


COLUMNS = {
    "ceiling": LADDER_COLUMNS,
    "idle": IDLE_COLUMNS,
    "broadcast": LADDER_COLUMNS,
    "targeted": TARGETED_COLUMNS,
    "connect-storm": STORM_COLUMNS,
    "slow": SLOW_COLUMNS,
    "scale": [("workers", "workers"), *LADDER_COLUMNS],
    **ephemeral.COLUMNS,
    **auth.COLUMNS,
}
"""Each scenario's columns, as it prints them."""


def markdown(path: Path) -> str:
    """The scenarios of a saved run (`--out` JSON) as Markdown tables, for bench/RESULTS.md."""
    document = json.loads(path.read_text())
    parts = []
    for name, saved in document["scenarios"].items():
        columns = COLUMNS[name]
        parts.append(f"### {name}\n")
        parts.append("| " + " | ".join(header for _, header in columns) + " |")
        parts.append("|" + "---|" * len(columns))
        for row in saved["rows"]:
            if "error" in row:
                parts.append(f"| {row.get('target', '?')} | error: {row['error']} |")
                continue
            parts.append("| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |")
        parts.extend(f"\n{note}" for note in saved["notes"])
        parts.append("")
    return "\n".join(parts)


def cpu_model() -> str:
    """The CPU model named in /proc/cpuinfo (else `platform.processor()`)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine() -> dict[str, Any]:
    """Where the figures were taken: cpu model and count, kernel, Python, library versions."""
    model = cpu_model()
    versions: dict[str, str | None] = {}
    for package in ("uvicorn", "starlette", "sse-starlette", "uvloop", "httptools", "orjson"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def write(path: Path, meta: dict[str, Any], reports: dict[str, Report]) -> None:
    """All figures so far as JSON: `{"meta": ..., "scenarios": {name: {rows, notes, summary}}}`."""
    document = {
        "meta": meta,
        "scenarios": {
            name: {"rows": r.rows, "notes": r.notes, "summary": r.summary}
            for name, r in reports.items()
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


async def run(args: argparse.Namespace, ctx: Context) -> dict[str, Report]:
    """Run the chosen scenarios in order, printing each table, rewriting `--out` after each."""
    reports: dict[str, Report] = {}
    meta = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "options": {k: v for k, v in vars(args).items() if k != "scenarios"},
        "sizes": ctx.sizes.__dict__,
        "machine": machine(),
    }
    for name in args.scenarios:
        began = time.monotonic()
        print(f"\n== {name} ==", flush=True)
        try:
            report = await SCENARIOS[name](ctx)
        except Exception as exc:  # one broken scenario must not lose the others' figures
            report = Report([("target", "target")], [{"error": f"{type(exc).__name__}: {exc}"}])
        report.summary["seconds"] = round(time.monotonic() - began, 1)
        reports[name] = report
        print(table(report))
        print(f"  ({report.summary['seconds']:.0f} s)", flush=True)
        write(args.out, meta, reports)
    return reports


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; unknown scenario or target names exit with status 2."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.suite", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=", ".join(SCENARIOS))
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument(
        "--ingest", choices=MODES, default="wal", help="ingest mode of userstream's database"
    )
    parser.add_argument(
        "--bus", choices=BUSES, default="stream", help="bus of userstream's relay and gateway"
    )
    parser.add_argument("--server-cpu", default="0", help="taskset -c list for servers")
    parser.add_argument("--client-cpu", default="1", help="cpu of client and publisher")
    parser.add_argument("--relay-cpu", help="cpu of userstream's relay (default: --client-cpu)")
    parser.add_argument(
        "--idle-connections",
        help="comma-separated counts for `idle` (default 10000,19000; quick 500); above about"
        " 19,000 use --idle-workers and --client-processes (20,000 open files per process)",
    )
    parser.add_argument("--idle-workers", type=int, default=1, help="server workers in `idle`")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="sseload processes in `idle`, each from its own source IP 127.0.0.<k>",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="JSON",
        help="print the tables of a saved run (an --out file) as Markdown, and run nothing",
    )
    parser.add_argument(
        "--userstream-from",
        type=Path,
        metavar="DIR",
        help="run the userstream target from this checkout (e.g. a `git worktree` of an"
        " earlier commit) to compare versions",
    )
    args = parser.parse_args(argv)
    args.scenarios = args.scenarios or list(SCENARIOS)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in TARGETS]
    if bad:
        parser.error(f"unknown target {', '.join(bad)}; choose from {', '.join(TARGETS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Pin this process to the client cpu, raise the open-file limit to its hard limit (the
    servers started from here inherit it), build the C client, run."""
    args = parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return
    os.sched_setaffinity(0, parse_cpus(args.client_cpu))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loadclient.build()
    sizes = QUICK if args.quick else FULL
    idle_counts = (
        tuple(int(n) for n in args.idle_connections.split(","))
        if args.idle_connections
        else sizes.idle_connections
    )
    ips = tuple(f"127.0.0.{k + 1}" for k in range(args.client_processes))
    server = durable_logical_server() if args.ingest == "wal" else postgres_server()
    with server as pg, redis_server() as redis_url:
        ctx = Context(
            sizes=sizes,
            server_cpu=args.server_cpu,
            client_cpu=args.client_cpu,
            targets=args.targets,
            make_target=target_factory(
                pg,
                redis_url,
                args.relay_cpu or args.client_cpu,
                args.userstream_from,
                args.ingest,
                args.bus,
            ),
            idle_connections=idle_counts,
            idle_workers=args.idle_workers,
            client_processes=args.client_processes,
            source_ips=ips if args.client_processes > 1 else (),
        )
        asyncio.run(run(args, ctx))
    print(f"\nfigures written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
