"""Real processes and real SSE clients for end-to-end tests.

`Processes` starts `userstream` commands (gateways, relays) as OS processes with a test's own
database and Redis prefix, waits until a gateway answers `/healthz`, and stops everything
afterwards. `StreamClient` holds one `/me/stream` connection (httpx + httpx-sse) in a task and
collects its SSE events.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
from httpx_sse import ServerSentEvent, aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from sync.bus_channels import ChannelBus
from tests.services import BUS, free_port

JWT_SECRET = "e2e-secret-that-is-long-enough-for-hs256"


def token(user_id: str, ttl_s: float = 600, secret: str = JWT_SECRET, **claims: Any) -> str:
    """An HS256 token for `user_id`."""
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + int(ttl_s), **claims}, secret)


@dataclass
class Gateway:
    """A running `userstream serve` process."""

    url: str
    process: subprocess.Popen[bytes]


@dataclass
class Processes:
    """Starts `userstream` commands with `env` and stops every one of them in `stop_all`."""

    env: dict[str, str]
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, *args: str, env: dict[str, str] | None = None, log_file: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Run `userstream <args>`; its output goes to `log_file` if given, else to the
        test's captured stderr."""
        with open(log_file, "ab") if log_file else contextlib.nullcontext() as log:
            process = subprocess.Popen(  # the child keeps its own copy of the log's descriptor
                [sys.executable, "-m", "gateway.cli", *args],
                env={**os.environ, **self.env, **(env or {})},
                stdout=log,
                stderr=log,
            )
        self.started.append(process)
        return process

    def gateway(
        self, *extra: str, env: dict[str, str] | None = None, log_file: Path | None = None
    ) -> Gateway:
        """Start `userstream serve` on a free port and wait (20 s at most) for `/healthz`."""
        port = free_port()
        process = self.start("serve", "--port", str(port), *extra, env=env, log_file=log_file)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return Gateway(url, process)
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway on port {port} did not become healthy")
            time.sleep(0.05)

    def stop_all(self) -> None:
        """SIGTERM everything still running, then SIGKILL what is left after 10 s."""
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class StreamClient:
    """One `/me/stream` connection; `events` collects every SSE event received, `retry` the
    last `retry:` value (ms)."""

    url: str
    headers: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)
    events: list[ServerSentEvent] = field(default_factory=list)
    response_headers: httpx.Headers | None = None
    status: int | None = None
    retry: int | None = None
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
            aconnect_sse(
                client, "GET", f"{self.url}/me/stream", headers=self.headers, params=self.params
            ) as source,
        ):
            self.status = source.response.status_code
            self.response_headers = source.response.headers
            async for event in source.aiter_sse():
                if event.retry is not None:
                    self.retry = event.retry
                if event.event == "message" and not event.data:
                    continue  # a block without data is not an event (WHATWG HTML §9.2.6)
                self.events.append(event)

    async def connect(self, timeout_s: float = 10) -> "StreamClient":
        """Open the stream and wait for its `offset` event."""
        self._task = asyncio.create_task(self._run())
        await self.wait_for(lambda: any(e.event == "offset" for e in self.events), timeout_s)
        return self

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float = 10) -> None:
        """Poll `condition` every 10 ms; raise AssertionError after `timeout_s` seconds."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self._task is not None and self._task.done():
                self._task.result()
                ending = self.events[-1].data if self.events else ""
                raise AssertionError(f"stream ended ({ending}); received {self.kinds()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; received {self.kinds()}")
            await asyncio.sleep(0.01)

    def kinds(self) -> list[str]:
        """The `event` field of everything received, in order."""
        return [e.event for e in self.events]

    def changes(self) -> list[dict[str, Any]]:
        """The parsed `data` of every `change` event, in order."""
        return [orjson.loads(e.data) for e in self.events if e.event == "change"]

    async def close(self) -> None:
        """Drop the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._task


def bearer(user_id: str, **claims: Any) -> dict[str, str]:
    """`Authorization: Bearer` headers for `user_id`."""
    return {"Authorization": f"Bearer {token(user_id, **claims)}"}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Prometheus samples by (name, sorted labels)."""


async def scrape(url: str) -> Samples:
    """Every sample of the Prometheus text exposition at `url` (a `/metrics` URL)."""
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


async def control_channel(redis_url: str, channel: str) -> tuple[str, str]:
    """Where the gateways' pub/sub `channel` (`{prefix}signals`, `{prefix}presence`) lives:
    (Redis URL, channel name). On a Redis Cluster the channel bus keeps it on the node of its
    control hash tag, under the tagged prefix (`sync.bus_channels.ChannelBus.control_bus`)."""
    if BUS != "cluster":
        return redis_url, channel
    prefix, _, suffix = channel.rpartition(":")
    bus = ChannelBus(redis_url, f"{prefix}:")
    try:
        control = await bus.control_bus()
        return control.url, f"{control.signals_channel.removesuffix('signals')}{suffix}"
    finally:
        await bus.close()


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 15
) -> None:
    """Poll the coroutine function `check` every 50 ms until it returns true; AssertionError
    naming `what` after `timeout_s` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
