"""A redis-server of our own, for the tests, the benchmarks and the demo: the repository's
redis.conf (AOF on, as in production), a free port, its own data directory. Never the Redis at
127.0.0.1:6379, which may hold someone's data."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from .net import free_port
from .processes import stop

REDIS_CONF = Path(__file__).resolve().parent.parent / "redis.conf"


@dataclass
class RedisServer:
    """One redis-server process, which its user may kill and start again on the same data."""

    dir: Path
    port: int = field(default_factory=free_port)
    extra_args: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> Self:
        """Start it and return once it answers PING (not merely listens: after a restart Redis
        answers -LOADING until its AOF is read back)."""
        if not shutil.which("redis-server"):
            raise SystemExit("redis-server is not installed: run `make redis` (apt-get install redis-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", str(REDIS_CONF), "--port", str(self.port), "--dir", str(self.dir),
             "--bind", "127.0.0.1", "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start; see {self.dir / 'redis.log'}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, exactly what a crash or OOM kill does."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (Redis saves and exits), SIGKILL if that takes too long."""
        stop(self.proc)


@contextlib.contextmanager
def running_redis(dir: Path, *extra_args: str) -> Iterator[RedisServer]:
    """A redis-server with its data in a fresh folder below `dir`, stopped on the way out."""
    port = free_port()
    server = RedisServer(dir / f"redis-{port}", port, extra_args).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class RedisClusterServers:
    """A local Redis Cluster of plain redis-server processes on free ports: `primaries` primaries
    holding the 16384 slots evenly, each with `replicas` replicas (which take over when their
    primary dies: the node timeout is short so a failover takes about two seconds)."""

    dir: Path
    primaries: int = 3
    replicas: int = 0
    node_timeout_ms: int = 1000
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        """REDIS_URL as a user sets it: every node as a seed (any one of them would do)."""
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 30) -> Self:
        count = self.primaries * (1 + self.replicas)
        for _ in range(count):
            port = free_port()
            self.nodes.append(RedisServer(
                self.dir / f"node-{port}", port,
                # The bus port must be given: by default it is port + 10000, which may be taken
                # or above 65535 for the free ports the OS hands out.
                ("--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                 "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(self.node_timeout_ms),
                 # A replica may take over however long it was cut off: the tests kill primaries.
                 "--cluster-replica-validity-factor", "0")).start())
        # `--cluster create` assigns the first `primaries` addresses as primaries.
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        self.wait_ok(timeout)
        return self

    def wait_ok(self, timeout: float = 30, *, nodes: Sequence[RedisServer] | None = None) -> None:
        """Until every (living) node reports cluster_state:ok and knows `primaries` primaries
        with slots, i.e. the cluster serves every slot again."""
        deadline = time.monotonic() + timeout
        watched = [n for n in (nodes or self.nodes) if n.proc and n.proc.poll() is None]
        while time.monotonic() < deadline:
            if all(self._ok(n.port) for n in watched):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the cluster in {self.dir} is not ok after {timeout} s")

    def _ok(self, port: int) -> bool:
        info = _cli(port, "CLUSTER", "INFO")
        if "cluster_state:ok" not in info:
            return False
        serving = [line for line in _cli(port, "CLUSTER", "NODES").splitlines()
                   if "master" in line.split()[2] and "fail" not in line.split()[2]
                   and len(line.split()) > 8]
        return len(serving) == self.primaries

    def primary_nodes(self) -> list[RedisServer]:
        """The nodes that are primaries now (a failover changes which)."""
        return [n for n in self.nodes if n.proc and n.proc.poll() is None
                and "role:master" in _cli(n.port, "INFO", "replication")]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cli(port: int, *command: str) -> str:
    done = subprocess.run(["redis-cli", "-p", str(port), *command], capture_output=True, text=True,
                          timeout=5, check=False)
    return done.stdout
