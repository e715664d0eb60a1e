"""Capture real pgoutput messages for `test_pgoutput.py`; rewrites `pgoutput_capture.py`.

Run by hand (about 5 s): `.venv/bin/python -m tests.unit.sync.capture_pgoutput`.

It starts a throwaway PostgreSQL 16 from the `pgserver` wheel with `wal_level = logical`
(`initdb`, then the setting appended to postgresql.conf before the server first starts; under
root the server runs as pgserver's `pgserver` system user), creates the tables of `SCHEMA`, a
publication of them and a `pgoutput` slot, runs each of `STEPS` as one transaction, then
streams the slot (`proto_version` 1, `messages` on; PostgreSQL 16 docs §55.5) and records
the raw payload of every message up to the last step's commit. The server and its data
folder are removed at the end, whatever happens.
"""

import logging
import os
import pwd
import select
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import psycopg2
import psycopg2.extensions
import psycopg2.extras

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

OUTPUT = Path(__file__).with_name("pgoutput_capture.py")
PUBLICATION = "capture_pub"
SLOT = "capture_slot"
TOAST_VALUE_SQL = "repeat('0123456789', 300)"  # 3000 bytes: stored out of line (EXTERNAL)

SCHEMA = (
    "CREATE TYPE mood AS ENUM ('calm', 'busy')",
    # default replica identity (the primary key); every value kind, an enum for a Type message
    "CREATE TABLE items (id int PRIMARY KEY, title text, qty int, doc jsonb,"
    " at timestamptz, mood mood)",
    # REPLICA IDENTITY FULL, no key at all
    "CREATE TABLE audit (id int, note text)",
    "ALTER TABLE audit REPLICA IDENTITY FULL",
    # REPLICA IDENTITY USING INDEX, a TOASTed column kept uncompressed and out of line
    "CREATE TABLE docs (id int NOT NULL, rev int, body text)",
    "CREATE UNIQUE INDEX docs_id ON docs (id)",
    "ALTER TABLE docs REPLICA IDENTITY USING INDEX docs_id",
    "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL",
    # an unpublished table: its changes never reach the stream
    "CREATE TABLE private (id int PRIMARY KEY)",
    f"CREATE PUBLICATION {PUBLICATION} FOR TABLE items, audit, docs",
    "SELECT pg_replication_origin_create('upstream')",
)


class Step(NamedTuple):
    """One transaction: `sql` runs inside it, `after` in autocommit once it committed."""

    label: str
    sql: tuple[str, ...]
    after: tuple[str, ...] = ()


STEPS = (
    Step(
        "insert every value kind",
        (
            "INSERT INTO items VALUES (1, 'first', 10, '{\"b\": [true, null], \"a\": 1}',"
            " '2024-05-06 07:08:09.123456+00', 'calm'),"
            " (2, NULL, NULL, NULL, NULL, NULL)",
        ),
    ),
    Step("update non-key columns", ("UPDATE items SET title = 'first, edited' WHERE id = 1",)),
    Step("update the key", ("UPDATE items SET id = 3 WHERE id = 1",)),
    Step("delete by key", ("DELETE FROM items WHERE id = 3",)),
    Step(
        "replica identity full",
        (
            "INSERT INTO audit VALUES (1, 'a'), (2, NULL)",
            "UPDATE audit SET note = 'b' WHERE id = 1",
            "DELETE FROM audit WHERE id = 2",
        ),
    ),
    Step("insert a toasted value", (f"INSERT INTO docs VALUES (1, 1, {TOAST_VALUE_SQL})",)),
    Step("update beside a toasted value", ("UPDATE docs SET rev = 2 WHERE id = 1",)),
    Step(
        "multi-statement transaction",
        (
            "INSERT INTO items (id, title, qty) VALUES (10, 'ten', 100)",
            "INSERT INTO private VALUES (1)",
            "UPDATE docs SET rev = 3 WHERE id = 1",
            "SELECT pg_logical_emit_message(true, 'p', 'x')",
            "UPDATE items SET qty = qty + 1 WHERE id = 10",
            "DELETE FROM audit WHERE id = 1",
        ),
    ),
    Step(
        "schema change",
        (
            "ALTER TABLE items ADD COLUMN extra int",
            "INSERT INTO items (id, title, extra) VALUES (20, 'after alter', 7)",
        ),
    ),
    Step(
        "replication origin",
        (
            "SELECT pg_replication_origin_session_setup('upstream')",
            "INSERT INTO audit VALUES (3, 'replayed')",
        ),
        after=("SELECT pg_replication_origin_session_reset()",),
    ),
    Step("truncate", ("TRUNCATE items, audit RESTART IDENTITY CASCADE",)),
)

KINDS = {
    "B": "begin",
    "C": "commit",
    "R": "relation",
    "Y": "type",
    "O": "origin",
    "M": "message",
    "I": "insert",
    "U": "update",
    "D": "delete",
    "T": "truncate",
}


def start_server(folder: Path) -> "PostgresServer":
    """initdb a cluster in `<folder>/pgdata` with `wal_level = logical` and start it; returns
    pgserver's PostgresServer (cleanup_mode "delete": `cleanup()` stops it, removes pgdata)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        from pgserver._commands import initdb  # type: ignore[attr-defined]  # made at import
        from pgserver.postgres_server import get_server
        from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    pgdata = folder / "pgdata"
    pgdata.mkdir()
    system_user = None
    if os.geteuid() == 0:  # as pgserver does: the server may not run as root
        system_user = "pgserver"
        ensure_user_exists(system_user)
        ensure_prefix_permissions(pgdata)
        entry = pwd.getpwnam(system_user)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    initdb(
        ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
        pgdata=pgdata,
        user=system_user,
    )
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write("\nwal_level = logical\n")
    return get_server(pgdata, cleanup_mode="delete")


def run_workload(dsn: str) -> str:
    """Create the schema, the slot (before any change) and run every step; returns
    `server_version`."""
    conn = psycopg2.connect(dsn)
    repl = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for sql in SCHEMA:
                cur.execute(sql)
            cur.execute("SHOW server_version")
            row = cur.fetchone()
            assert row is not None
            version = str(row[0])
        with repl.cursor() as rcur:
            rcur.create_replication_slot(SLOT, output_plugin="pgoutput")
        for step in STEPS:
            conn.autocommit = False
            with conn.cursor() as cur:
                for sql in step.sql:
                    cur.execute(sql)
            conn.commit()
            conn.autocommit = True
            with conn.cursor() as cur:
                for sql in step.after:
                    cur.execute(sql)
        return version
    finally:
        repl.close()
        conn.close()


def stream(dsn: str) -> list[bytes]:
    """Every payload of the slot, up to the commit of the last step (30 s at most)."""
    conn = psycopg2.connect(
        dsn,
        connection_factory=psycopg2.extras.LogicalReplicationConnection,
        options="-c TimeZone=UTC -c DateStyle=ISO",  # the walsender formats the values
    )
    payloads: list[bytes] = []
    try:
        cur = conn.cursor()
        cur.start_replication(
            slot_name=SLOT,
            decode=False,
            options={
                "proto_version": "1",
                "publication_names": PUBLICATION,
                "messages": "true",
            },
        )
        commits = 0
        deadline = time.monotonic() + 30
        while commits < len(STEPS):
            msg = cur.read_message()
            if msg is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {commits} of {len(STEPS)} commits streamed")
                select.select([cur], [], [], 1.0)
                continue
            payload = bytes(msg.payload)
            payloads.append(payload)
            commits += payload[:1] == b"C"
    finally:
        conn.close()
    return payloads


def describe(payloads: list[bytes]) -> list[tuple[str, bytes]]:
    """Label each payload `<step>: <kind>`, the step counted by Begin messages."""
    described = []
    step = -1
    for payload in payloads:
        kind = chr(payload[0])
        step += kind == "B"
        described.append((f"{STEPS[step].label}: {KINDS.get(kind, kind)}", payload))
    if step != len(STEPS) - 1:
        raise RuntimeError(f"{step + 1} transactions streamed for {len(STEPS)} steps")
    return described


def render(version: str, messages: list[tuple[str, bytes]]) -> str:
    """The fixture module's source, formatted as `ruff format` would."""
    lines = [
        f'"""Raw pgoutput messages (protocol 1) from PostgreSQL {version}, in the order one',
        "replication session received them. Written by `python -m",
        "tests.unit.sync.capture_pgoutput` (the schema and statements are there); do not edit.",
        "",
        'Each entry is ("<step>: <message kind>", payload)."""',
        "",
        f'SERVER_VERSION = "{version}"',
        "",
        "MESSAGES: list[tuple[str, bytes]] = [",
    ]
    for label, payload in messages:
        hexed = payload.hex()
        lines += ["    (", f'        "{label}",']
        if len(hexed) <= 100 - len('        bytes.fromhex(""),'):
            lines.append(f'        bytes.fromhex("{hexed}"),')
        elif len(hexed) <= 100 - len('            ""'):
            lines += ["        bytes.fromhex(", f'            "{hexed}"', "        ),"]
        else:
            lines.append("        bytes.fromhex(")
            lines += [f'            "{hexed[i : i + 80]}"' for i in range(0, len(hexed), 80)]
            lines.append("        ),")
        lines.append("    ),")
    lines.append("]")
    return "\n".join(lines) + "\n"


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="pgoutput-capture-"))
    server = None
    try:
        server = start_server(folder)
        dsn = server.get_uri("postgres")
        version = run_workload(dsn)
        messages = describe(stream(dsn))
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
    OUTPUT.write_text(render(version, messages))
    print(f"{len(messages)} messages from PostgreSQL {version} written to {OUTPUT}")


if __name__ == "__main__":
    main()
