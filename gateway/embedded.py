"""An embedded Postgres for one-process mode (DESIGN.md: `userstream demo`, `serve` without
`DATABASE_URL`), run from the binaries of the `pgserver` wheel.

The server listens on a Unix socket only (no TCP port), in or beside its data folder, and
trusts local connections: it is for a developer's machine, not for production.
"""

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

logger = logging.getLogger(__name__)


@dataclass
class EmbeddedPostgres:
    """A running embedded server: `dsn` is an asyncpg/libpq DSN for database `postgres`,
    `data_dir` its data folder."""

    dsn: str
    data_dir: Path
    _server: "PostgresServer"

    def stop(self) -> None:
        """Stop the server (`pg_ctl stop`, fast shutdown) unless another process still uses
        it; the data folder is kept. Calling it again does nothing."""
        self._server.cleanup()


def start_embedded_postgres(data_dir: str) -> EmbeddedPostgres:
    """Start (or reuse) the Postgres whose data lives in `<data_dir>/pgdata`; blocks until it
    accepts connections (pg_ctl waits, at most about 10 s).

    First run: `<data_dir>` is created if needed, `initdb` makes a new cluster (superuser
    `postgres`, trust authentication, UTF-8; about a second) and the server starts. Later
    runs find `PG_VERSION` and start the existing cluster with all its data, or attach to it
    if it is already running. The server is stopped by `stop()` or, at the latest, when the
    process exits, unless another live process attached to it too. Under root, pgserver runs
    the server as a `pgserver` system user it creates. Raises subprocess.CalledProcessError
    or subprocess.TimeoutExpired (with the server log in the pgserver log) if it cannot start.
    """
    pgserver_log = logging.getLogger("pgserver")
    if pgserver_log.level == logging.NOTSET:
        # pgserver logs initdb's output and every pg_ctl command line at INFO; keep its
        # warnings and errors (a failed start includes the server log) and say one line here.
        pgserver_log.setLevel(logging.WARNING)
    pgdata = Path(data_dir).expanduser().resolve() / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    first_run = not (pgdata / "PG_VERSION").exists()
    _forget_dead_handles(pgdata)
    with warnings.catch_warnings():
        # platformdirs warns at pgserver's import when XDG_RUNTIME_DIR is unset; the
        # fallback it takes (/tmp/runtime-<uid>) is fine for a socket directory.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        from pgserver.postgres_server import get_server

    server = get_server(pgdata, cleanup_mode="stop")
    dsn = server.get_uri("postgres")
    logger.info(
        "embedded Postgres %s in %s (%s)",
        "initialised and started" if first_run else "started",
        pgdata,
        dsn,
    )
    return EmbeddedPostgres(dsn, pgdata, server)


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
