"""Nchan (nginx + the Nchan module) as a benchmark target.

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
import shutil
import tempfile
import zlib
from pathlib import Path

from bench.targets import ChannelServer, Scope
from bench.targets.processes import PinnedProcess, wait_until_serving
from tests.services import free_port

NGINX_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
"""Where Debian's `libnginx-mod-nchan` installs the module."""

TEMPLATE = Path(__file__).with_name("nchan.conf.template")


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


class NchanTarget(ChannelServer):
    """Nchan 1.3 with its in-memory store, as the `Target` protocol of `bench.targets`.

    Channels: `ws1` for broadcast, `u<i>` for user i. Subscribers start at the newest message;
    each channel buffers at most 5 messages for at most 10 s (`nchan.conf.template`), so memory
    stays bounded under load. `ready_marker` is Nchan's `: hi` comment.
    """

    name = "nchan"
    ready_marker = b": hi"

    def __init__(self, publish_connections: int = 4) -> None:
        self._publish_connections = publish_connections
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
