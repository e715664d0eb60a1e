"""An embedded Postgres for one-process mode (DESIGN.md: `userstream demo`, `serve` without
`DATABASE_URL`), run from the binaries of the `pgserver` wheel (Postgres 16).

The server listens on a Unix socket only (no TCP port), in or beside its data folder, and
trusts local connections, replication ones included (initdb's `--auth-local=trust` writes
`local replication all trust` to pg_hba.conf): it is for a developer's machine, not for
production. It runs with logical decoding on (`wal_level = logical`, 10 WAL senders, 10
replication slots), so the relay's `wal` ingest mode can read a pgoutput slot from it. These
settings live in `userstream.conf` in the data folder, included at the end of
`postgresql.conf` and rewritten before each start; `ALTER SYSTEM` (postgresql.auto.conf,
read later) still overrides them.
"""

import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

logger = logging.getLogger(__name__)

LOGICAL_DECODING: Final[Mapping[str, str]] = MappingProxyType(
    {"wal_level": "logical", "max_wal_senders": "10", "max_replication_slots": "10"}
)
"""Server settings for logical decoding (PostgreSQL docs, 31.11 "Logical Replication:
Configuration Settings"; 20.5.1 `wal_level`, 20.6.1 `max_wal_senders`,
`max_replication_slots`). All three need a restart to change."""

SETTINGS_FILE: Final = "userstream.conf"
_INCLUDE_LINE: Final = f"include_if_exists = '{SETTINGS_FILE}'"
# initdb's arguments as pgserver's PostgresServer.ensure_pgdata_inited passes them.
_INITDB_ARGS: Final = ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"]


@dataclass
class EmbeddedPostgres:
    """A running embedded server: `dsn` is an asyncpg/libpq DSN for database `postgres`,
    `data_dir` its data folder, `logical` whether the server reported `wal_level = logical`
    when started (false when it was already running with another level, or the query
    failed)."""

    dsn: str
    data_dir: Path
    _server: "PostgresServer"
    logical: bool = False

    def stop(self) -> None:
        """Stop the server (`pg_ctl stop`, fast shutdown) unless another process still uses
        it; the data folder is kept. Calling it again does nothing."""
        self._server.cleanup()


def start_embedded_postgres(data_dir: str) -> EmbeddedPostgres:
    """Start (or reuse) the Postgres whose data lives in `<data_dir>/pgdata`; blocks until it
    accepts connections (pg_ctl waits, at most about 10 s).

    First run: `<data_dir>` is created if needed, `initdb` makes a new cluster (superuser
    `postgres`, trust authentication, UTF-8; about a second) and the server starts with
    `LOGICAL_DECODING`. Later runs find `PG_VERSION`, write the settings again (so a cluster
    made with `wal_level = replica` gets logical decoding) and start the existing cluster
    with all its data, or attach to it if it is already running: its settings are then left
    alone, and if it runs without logical decoding one line is logged (off until it
    restarts). One `SHOW wal_level` after the start sets `logical`. The server is stopped by
    `stop()` or, at the latest, when the process exits, unless another live process attached
    to it too. Under root, the server runs as a `pgserver` system user (created if missing).
    Raises subprocess.CalledProcessError or subprocess.TimeoutExpired (with the server log in
    the pgserver log) if it cannot start.
    """
    pgserver_log = logging.getLogger("pgserver")
    if pgserver_log.level == logging.NOTSET:
        # pgserver logs initdb's output and every pg_ctl command line at INFO; keep its
        # warnings and errors (a failed start includes the server log) and say one line here.
        pgserver_log.setLevel(logging.WARNING)
    pgdata = Path(data_dir).expanduser().resolve() / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    first_run = not (pgdata / "PG_VERSION").exists()
    _forget_dead_handles(pgdata)
    prepared = prepare_pgdata(pgdata)
    server = _pgserver_module().get_server(pgdata, cleanup_mode="stop")
    dsn = server.get_uri("postgres")
    wal_level = _wal_level(dsn)
    logger.info(
        "embedded Postgres %s in %s (%s, wal_level=%s)",
        "initialised and started" if first_run else "started" if prepared else "attached",
        pgdata,
        dsn,
        wal_level,
    )
    if wal_level != "logical":
        logger.warning(
            "embedded Postgres in %s runs with wal_level=%s: logical decoding is off until "
            "it restarts",
            pgdata,
            wal_level,
        )
    return EmbeddedPostgres(dsn, pgdata, server, logical=wal_level == "logical")


def prepare_pgdata(pgdata: Path, settings: Mapping[str, str] = LOGICAL_DECODING) -> bool:
    """Make `pgdata` (an existing folder, empty or a Postgres 16 cluster) a cluster that
    starts with `settings` (GUC name -> value, written quoted to `userstream.conf`, which
    `postgresql.conf` includes last), unless a server already runs on it.

    A folder without `PG_VERSION` gets a new cluster first, made as pgserver makes one
    (leftover servers of an earlier cluster there are ended; under root the folder is handed
    to the `pgserver` system user and the binaries made readable; initdb with trust
    authentication, UTF-8, superuser `postgres`). Holds pgserver's inter-process lock, so a
    concurrent `pgserver.get_server` on the same folder waits. Returns True when the settings
    were written (they apply at the next start), False when a server was running on `pgdata`
    and nothing was changed. Raises subprocess.CalledProcessError if initdb fails, OSError
    if the folder cannot be written.
    """
    module = _pgserver_module()
    with module.PostgresServer._lock:
        if not (pgdata / "PG_VERSION").exists():
            _initdb(pgdata, module)
        elif _server_running(pgdata):
            return False
        _write_settings(pgdata, settings)
    return True


def _initdb(pgdata: Path, module: Any) -> None:
    """A new cluster in `pgdata`: the steps of pgserver's PostgresServer.ensure_pgdata_inited
    (`module` is `pgserver.postgres_server`, which holds pgserver's initdb and permission
    helpers), done here so the settings can be written between initdb and the first start."""
    system_user = None
    if os.geteuid() == 0:
        import pwd
        import stat

        system_user = "pgserver"
        module.ensure_user_exists(system_user)
        module.ensure_prefix_permissions(pgdata)
        module.ensure_prefix_permissions(module.POSTGRES_BIN_PATH)
        read = stat.S_IRGRP | stat.S_IROTH
        execute = stat.S_IXGRP | stat.S_IXOTH
        module.ensure_folder_permissions(module.POSTGRES_BIN_PATH, execute | read)
        module.ensure_folder_permissions(module.POSTGRES_BIN_PATH.parent / "lib", read)
        entry = pwd.getpwnam(system_user)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    _end_leftover_servers(pgdata, module)
    module.initdb(_INITDB_ARGS, pgdata=pgdata, user=system_user)


def _end_leftover_servers(pgdata: Path, module: Any) -> None:
    """End postgres processes still serving an earlier, deleted cluster in `pgdata` (as
    pgserver does before initdb: such a server may write into the new cluster)."""
    psutil = module.psutil
    for proc in psutil.process_iter(attrs=["name", "cmdline"]):
        if proc.info["name"] == "postgres" and str(pgdata) in (proc.info["cmdline"] or []):
            logger.warning("ending leftover postgres %s of %s", proc.pid, pgdata)
            try:
                proc.terminate()
                proc.wait(2)
            except psutil.TimeoutExpired:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def _write_settings(pgdata: Path, settings: Mapping[str, str]) -> None:
    """Write `userstream.conf` and include it at the end of `postgresql.conf` (once);
    values are single-quoted with `'` doubled (PostgreSQL docs, 20.1.2 "Parameter
    Interaction via the Configuration File")."""
    lines = ["# Written by userstream before each start of this server; edits are lost."]
    lines += [
        f"{name} = '{value.replace(chr(39), chr(39) * 2)}'" for name, value in settings.items()
    ]
    target = pgdata / SETTINGS_FILE
    target.write_text("\n".join(lines) + "\n")
    owner = pgdata.stat()
    if os.geteuid() == 0:
        os.chown(target, owner.st_uid, owner.st_gid)
    conf = pgdata / "postgresql.conf"
    text = conf.read_text()
    if _INCLUDE_LINE not in text.splitlines():
        with conf.open("a") as out:
            out.write(("" if text.endswith("\n") else "\n") + _INCLUDE_LINE + "\n")


def _server_running(pgdata: Path) -> bool:
    """Whether `postmaster.pid` names a live process (a file too short to read is a server
    still starting)."""
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
    except FileNotFoundError:
        return False
    try:
        return _alive(int(first))
    except ValueError:
        return True


def _wal_level(dsn: str) -> str:
    """`SHOW wal_level` on the server at `dsn`; "unknown" (logged) if the query fails."""
    import psycopg2

    try:
        conn = psycopg2.connect(dsn, connect_timeout=10)
    except psycopg2.Error as exc:
        logger.warning("could not read wal_level of the embedded Postgres: %s", exc)
        return "unknown"
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW wal_level")
            row = cur.fetchone()
        return str(row[0]) if row else "unknown"
    except psycopg2.Error as exc:
        logger.warning("could not read wal_level of the embedded Postgres: %s", exc)
        return "unknown"
    finally:
        conn.close()


def _pgserver_module() -> Any:
    """`pgserver.postgres_server`, imported without its XDG_RUNTIME_DIR warning: the fallback
    platformdirs takes (/tmp/runtime-<uid>) is fine for a lock file and a socket directory."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        from pgserver import postgres_server

    return postgres_server


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop processes that no longer exist from pgserver's list of the server's users.

    pgserver stops the server only when the last process in `.handle_pids.json` lets go; a
    process killed with SIGKILL would stay in that list and keep the server running forever.
    """
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
