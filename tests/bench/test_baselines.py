"""The benchmark's baseline targets (Nchan, the plain sse-starlette app) serve what the suite
expects of them: real servers, real SSE clients (httpx + httpx-sse).

Each target starts pinned to this process's CPUs, with one and with two worker processes.
Three clients subscribe to the broadcast paths and three to the targeted paths; each must see
the target's `ready_marker` as its first line. Events are then published through the target's
own publisher, broadcast and targeted, each run closed by one sentinel per channel; once every
client has its sentinel, each must hold exactly its own events, in publish order, as
`change` events. After `stop()` none of the server's processes and no temporary directory of
the target is left.
"""

import asyncio
import contextlib
import functools
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse

from bench.targets import Scope, Target, payload
from bench.targets.nchan import NchanTarget, nchan_missing
from bench.targets.plain import PlainTarget
from bench.targets.processes import alive

CPUS = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
USERS = 3
WAIT_S = 10.0
"""Upper bound on any wait below: a failure guard, not a measurement."""


@dataclass
class Subscriber:
    """One SSE connection: its first non-empty line and its events (`event`, `data`)."""

    url: str
    first_line: str | None = None
    events: list[tuple[str, str]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
            aconnect_sse(client, "GET", self.url) as source,
        ):
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith("text/event-stream")
            event, data = "message", list[str]()
            async for line in source.response.aiter_lines():
                if self.first_line is None and line:
                    self.first_line = line
                if not line:  # a blank line dispatches the event (WHATWG HTML §9.2.6)
                    if data:
                        self.events.append((event, "\n".join(data)))
                    event, data = "message", []
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "event":
                        event = value
                    elif name == "data":
                        data.append(value)

    def started(self) -> bool:
        """Whether the response has sent its first line."""
        return self.first_line is not None

    def received(self, body: bytes) -> bool:
        """Whether an event carrying `body` as its data has arrived."""
        return any(data == body.decode() for _, data in self.events)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Poll `condition` every 10 ms; AssertionError if the stream ends or WAIT_S passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not condition():
            if self._task is not None and self._task.done():
                self._task.result()
                raise AssertionError(f"{self.url}: stream ended after {self.events}")
            if loop.time() > deadline:
                raise AssertionError(f"{self.url}: timed out; {self.first_line=} {self.events}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._task


def make_target(name: str, redis_url: str) -> Target:
    if name == "nchan":
        return NchanTarget()
    return PlainTarget(redis_url)


def expected_processes(name: str, workers: int) -> int:
    """nginx: master + workers. uvicorn: one process, or with `--workers N` its supervisor,
    multiprocessing's resource tracker and N workers."""
    if name == "nchan":
        return workers + 1
    return 1 if workers == 1 else workers + 2


def body(label: str) -> bytes:
    """A payload whose `pad` is preceded by a label, so each event is recognisable."""
    return payload(120).replace(b'"pad":"', f'"pad":"{label}-'.encode())


async def publish_runs(target: Target, scope: Scope, runs: list[list[tuple[int, bytes]]]) -> None:
    for bodies in runs:
        await target.publish(scope, bodies)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            "nchan",
            marks=pytest.mark.skipif(nchan_missing() is not None, reason=str(nchan_missing())),
        ),
        "plain",
    ],
)
async def test_target_delivers_broadcast_and_targeted_events(
    name: str, workers: int, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the target makes its dir
    target = make_target(name, redis_url)
    await target.start(cpu=CPUS, users=USERS, scope="broadcast", workers=workers)
    subscribers: list[Subscriber] = []
    try:
        pids = target.server_pids()
        assert len(pids) == expected_processes(name, workers)
        host, port = target.host_port()
        broadcast_paths = target.paths(USERS, "broadcast")
        targeted_paths = target.paths(USERS, "targeted")
        assert len(set(broadcast_paths)) == 1
        assert len(set(targeted_paths)) == USERS
        subscribers = [
            Subscriber(f"http://{host}:{port}{path}") for path in broadcast_paths + targeted_paths
        ]
        for subscriber in subscribers:
            subscriber.start()
        marker = target.ready_marker.decode()
        for subscriber in subscribers:
            await subscriber.wait_for(subscriber.started)
            assert subscriber.first_line == marker

        broadcast = [[(0, body("b1")), (0, body("b2")), (0, body("b3"))], [(0, body("b4"))]]
        targeted = [[(0, body("t0a")), (2, body("t2a")), (0, body("t0b"))], [(1, body("t1a"))]]
        await publish_runs(target, "broadcast", broadcast)
        await publish_runs(target, "targeted", targeted)
        end_broadcast = body("end")
        ends = [body(f"end-u{user}") for user in range(USERS)]
        await target.publish("broadcast", [(0, end_broadcast)])
        await target.publish("targeted", list(enumerate(ends)))

        expected_broadcast = [b for run in broadcast for _, b in run] + [end_broadcast]
        expected = [expected_broadcast] * USERS + [
            [b for run in targeted for u, b in run if u == user] + [ends[user]]
            for user in range(USERS)
        ]
        for subscriber, bodies in zip(subscribers, expected, strict=True):
            await subscriber.wait_for(functools.partial(subscriber.received, bodies[-1]))
            assert subscriber.events == [("change", b.decode()) for b in bodies]
    finally:
        await target.stop()
        for subscriber in subscribers:
            await subscriber.close()
    assert target.server_pids() == []
    assert [pid for pid in pids if alive(pid)] == []
    assert os.listdir(tmp_path) == []
