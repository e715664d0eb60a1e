"""Nchan (nginx + the Nchan module) as a benchmark target, and the process helpers the
baseline targets share.

Nchan's EventSource subscriber answers `200` with `Content-Type: text/event-stream`, then sends
the comment `: hi` followed by a blank line as soon as the subscriber is enqueued on its channel
(`es_ensure_headers_sent` in Nchan's `src/subscribers/eventsource.c`); that comment is the
target's ready marker. Nchan serves a subscriber only when the request carries
`Accept: text/event-stream` (without it the `eventsource`-only location answers `403`).
Messages come as `event: change` (forced by `nchan_eventsource_event`), `id: <message id>`,
then one `data:` line per line of the published body.

Publishing is Nchan's HTTP publisher: `POST /pub/<channel>` with the body as the message,
answered `201 Created` or `202 Accepted` with a short channel-info body
(https://nchan.io/#publishing-messages). `HttpPublisher` sends those POSTs pipelined over a few
persistent HTTP/1.1 connections (RFC 9112 §9.3.2), each channel always over the same connection
so that one channel's messages keep their order.

Requires Debian's `nginx-light` (or `nginx`) and `libnginx-mod-nchan` packages.
"""

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

from bench.targets import Scope
from tests.services import free_port

NGINX_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
"""Where Debian's `libnginx-mod-nchan` installs the module."""

TEMPLATE = Path(__file__).with_name("nchan.conf.template")
STOP_GRACE_S = 5.0
START_TIMEOUT_S = 15.0


def nchan_missing() -> str | None:
    """Why Nchan cannot run here (`None` when nginx and the Nchan module are installed)."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        return "nginx is not installed (apt-get install nginx-light libnginx-mod-nchan)"
    if not NGINX_MODULE.exists():
        return f"{NGINX_MODULE} is missing (apt-get install libnginx-mod-nchan)"
    if shutil.which("taskset") is None:
        return "taskset is not installed (util-linux)"
    return None


def _nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


_PDEATHSIG = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """`(state, ppid, pgid)` of a process from `/proc/<pid>/stat`, `None` once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[2])


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie counts as gone)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every living process below `pid` (children, grandchildren...), from `/proc`."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[0] not in ("Z", "X"):
                parents[stat[1]].append(int(entry))
    found: list[int] = []
    queue = [pid]
    while queue:
        children = parents.get(queue.pop(), [])
        found.extend(children)
        queue.extend(children)
    return sorted(found)


def group_members(pgid: int) -> list[int]:
    """Living processes whose process group is `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[0] not in ("Z", "X") and stat[2] == pgid:
                members.append(int(entry))
    return members


class PinnedProcess:
    """A server process started as `taskset -c <cpu> <argv>` in a process group of its own.

    `taskset` execs the server, so `pid` is the server's own (nginx master, uvicorn main
    process); its workers are its children and share its CPU affinity and process group.
    Where util-linux's `setpriv` is installed the server also gets SIGTERM when the thread
    that started it dies (`PR_SET_PDEATHSIG`, prctl(2)), so a benchmark killed outright
    leaves no server behind: start it from the thread running the event loop.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        cpu: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [*_PDEATHSIG, "taskset", "-c", cpu, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.pid = self.process.pid
        self.log_path = log_path

    def running(self) -> bool:
        """Whether the main process has not exited."""
        return self.process.poll() is None

    def pids(self) -> list[int]:
        """The main process and its descendants (empty once it has exited)."""
        return [self.pid, *descendants(self.pid)] if self.running() else []

    def log_tail(self, size: int = 2000) -> str:
        """The last `size` bytes of the server's output, for error messages."""
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        return ""

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the main process; SIGKILL its whole process group if anything of it is
        still alive after `grace_s` seconds. Returns once every member has gone."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
        if not await poll(lambda: not self.running() and not group_members(self.pid), grace_s):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        await asyncio.to_thread(self.process.wait)
        await poll(lambda: not group_members(self.pid), grace_s)


async def poll(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.05) -> bool:
    """Check `condition` every `every_s` seconds until it holds (True) or `timeout_s` seconds
    have passed (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(every_s)
    return True


async def http_status(host: str, port: int, path: str, timeout_s: float = 2.0) -> int | None:
    """Status code of `GET path` (HTTP/1.1, `Connection: close`), `None` when nothing
    answers."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    parts = status_line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


async def wait_until_serving(
    server: PinnedProcess, host: str, port: int, path: str, timeout_s: float = START_TIMEOUT_S
) -> None:
    """Poll `GET path` until it answers 200. Raises RuntimeError if the server exits or does
    not answer within `timeout_s` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await http_status(host, port, path) != 200:
        if not server.running():
            raise RuntimeError(
                f"server exited with {server.process.returncode}: {server.log_tail()}"
            )
        if loop.time() > deadline:
            raise RuntimeError(f"server on port {port} did not answer {path}: {server.log_tail()}")
        await asyncio.sleep(0.05)


class _PipelinedConnection:
    """One keep-alive HTTP/1.1 connection carrying pipelined POSTs; responses come back in
    request order (RFC 9112 §9.3.2), each resolving the oldest pending future with its
    status code."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: collections.deque[asyncio.Future[int]] = collections.deque()
        self._task = asyncio.create_task(self._read_responses())

    @property
    def usable(self) -> bool:
        return not self._task.done()

    async def send(self, requests: list[bytes]) -> list[asyncio.Future[int]]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        self._pending.extend(futures)
        self._writer.write(b"".join(requests))
        await self._writer.drain()
        return futures

    async def _read_responses(self) -> None:
        try:
            while True:
                head = await self._reader.readuntil(b"\r\n\r\n")
                status, length, chunked = _parse_head(head)
                if chunked:
                    await _skip_chunked(self._reader)
                elif length:
                    await self._reader.readexactly(length)
                if not self._pending:
                    raise RuntimeError("response without a request")
                future = self._pending.popleft()
                if not future.done():
                    future.set_result(status)
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            RuntimeError,
            ValueError,
        ) as exc:
            error = RuntimeError(f"publisher connection failed: {exc!r}")
            while self._pending:
                future = self._pending.popleft()
                if not future.done():
                    future.set_exception(error)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """`(status, content_length, chunked)` of a response head. Raises ValueError."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    return status, length, chunked


async def _skip_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b""):
                pass  # trailer fields
            return
        await reader.readexactly(size + 2)


class HttpPublisher:
    """POSTs message bodies to `/pub/<channel>` over `connections` persistent connections.

    A channel always maps to the same connection (CRC-32 of its name), so messages of one
    channel reach Nchan, and subscribers, in publish order. Connections are opened lazily and
    reopened after a failure.
    """

    def __init__(self, host: str, port: int, connections: int = 4) -> None:
        self._host = host
        self._port = port
        self._slots: list[_PipelinedConnection | None] = [None] * connections

    async def _connection(self, slot: int) -> _PipelinedConnection:
        conn = self._slots[slot]
        if conn is None or not conn.usable:
            if conn is not None:
                await conn.close()
            reader, writer = await asyncio.open_connection(self._host, self._port)
            conn = self._slots[slot] = _PipelinedConnection(reader, writer)
        return conn

    def _request(self, channel: str, body: bytes) -> bytes:
        return (
            f"POST /pub/{channel} HTTP/1.1\r\nHost: {self._host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def publish(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish `(channel, body)` pairs and wait for every answer. Raises RuntimeError
        if a connection fails or Nchan answers anything but 201/202."""
        batches: dict[int, list[bytes]] = collections.defaultdict(list)
        for channel, body in messages:
            slot = zlib.crc32(channel.encode()) % len(self._slots)
            batches[slot].append(self._request(channel, body))
        futures: list[asyncio.Future[int]] = []
        for slot, requests in batches.items():
            conn = await self._connection(slot)
            futures.extend(await conn.send(requests))
        statuses = await asyncio.gather(*futures)
        failed = [status for status in statuses if status not in (201, 202)]
        if failed:
            raise RuntimeError(f"Nchan refused {len(failed)} publish(es): status {failed[0]}")

    async def close(self) -> None:
        """Close every connection."""
        for slot, conn in enumerate(self._slots):
            if conn is not None:
                await conn.close()
                self._slots[slot] = None


class NchanTarget:
    """Nchan 1.3 with its in-memory store, as the `Target` protocol of `bench.targets`.

    Channels: `ws1` for broadcast, `u<i>` for user i. Subscribers start at the newest message;
    each channel buffers at most 5 messages for at most 10 s (`nchan.conf.template`), so memory
    stays bounded under load. `ready_marker` is Nchan's `: hi` comment.
    """

    name = "nchan"
    ready_marker = b": hi"

    def __init__(self, publish_connections: int = 4) -> None:
        self._publish_connections = publish_connections
        self._host = "127.0.0.1"
        self._port = 0
        self._dir: Path | None = None
        self._server: PinnedProcess | None = None
        self._publisher: HttpPublisher | None = None

    async def start(self, *, cpu: str, users: int, scope: Scope, workers: int = 1) -> None:
        """Write nginx.conf into a temporary prefix directory and start nginx (master and
        `workers` worker processes) under `taskset -c cpu`; returns once it answers
        `/healthz`. Raises RuntimeError when nginx or the module is missing or nginx fails."""
        missing = nchan_missing()
        if missing:
            raise RuntimeError(missing)
        self._port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="bench-nchan-"))
        self._dir.chmod(0o755)  # workers run as an unprivileged user when nginx starts as root
        config = (
            TEMPLATE.read_text()
            .replace("@MODULE@", str(NGINX_MODULE))
            .replace("@WORKERS@", str(workers))
            .replace("@DIR@", str(self._dir))
            .replace("@PORT@", str(self._port))
        )
        conf_path = self._dir / "nginx.conf"
        conf_path.write_text(config)
        argv = [
            _nginx_binary(),
            "-p",
            str(self._dir),
            "-c",
            str(conf_path),
            "-e",
            str(self._dir / "error.log"),
        ]
        self._server = PinnedProcess(argv, cpu=cpu, log_path=self._dir / "output.log")
        try:
            await wait_until_serving(self._server, self._host, self._port, "/healthz")
        except RuntimeError as exc:
            error_log = (self._dir / "error.log").read_text(errors="replace")[-2000:]
            await self.stop()
            raise RuntimeError(f"{exc}\n{error_log}") from exc
        self._publisher = HttpPublisher(self._host, self._port, self._publish_connections)

    def host_port(self) -> tuple[str, int]:
        """`("127.0.0.1", port)` of the nginx listener."""
        return self._host, self._port

    def paths(self, users: int, scope: Scope) -> list[str]:
        """`/sub/ws1` for every connection (broadcast) or `/sub/u<i>` (targeted)."""
        if scope == "broadcast":
            return ["/sub/ws1"] * users
        return [f"/sub/u{i}" for i in range(users)]

    async def publish(self, scope: Scope, bodies: list[tuple[int, bytes]]) -> None:
        """POST each body to `/pub/ws1` (broadcast) or `/pub/u<i>` (targeted), pipelined;
        returns once Nchan has accepted every one. Raises RuntimeError otherwise."""
        if self._publisher is None:
            raise RuntimeError("NchanTarget.publish before start")
        if scope == "broadcast":
            await self._publisher.publish([("ws1", body) for _, body in bodies])
        else:
            await self._publisher.publish([(f"u{user}", body) for user, body in bodies])

    def server_pids(self) -> list[int]:
        """The nginx master and its worker processes."""
        return self._server.pids() if self._server is not None else []

    async def stop(self) -> None:
        """Close the publisher, stop nginx (SIGTERM: fast shutdown; SIGKILL after 5 s) and
        remove the temporary directory."""
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
