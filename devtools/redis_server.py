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
