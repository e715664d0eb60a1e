"""Server processes of the benchmark targets: started pinned to cpus, found with their
children, stopped without leftovers, and waited for until they answer HTTP.

Readings come from `/proc` (proc(5)): `/proc/<pid>/stat` for state and process group,
`/proc/<pid>/task/<tid>/children` (Linux >= 3.5) for children.
"""

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

START_TIMEOUT_S = 15.0
"""How long `wait_until_serving` waits by default, seconds."""
STOP_GRACE_S = 5.0
"""How long `PinnedProcess.stop` waits after SIGTERM before SIGKILL, seconds."""

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
