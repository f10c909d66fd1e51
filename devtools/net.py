"""Ports and readiness for the processes the tests, the benchmarks, the demo and the container
smoke test start: a free localhost port, waiting for a port to listen and for a URL to answer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable

import aiohttp


def free_port() -> int:
    """A localhost port nobody listens on right now (the OS picks it), for a server we start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    """Block until something accepts connections on localhost:port; fail early if `proc`, the
    process that should listen there, exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


async def wait_http(url: str, *, timeout: float = 15.0, interval: float = 0.05,
                    alive: Callable[[], Awaitable[None]] | None = None) -> float:
    """Poll `url` until it answers 200; the seconds that took. `alive` runs between polls and
    raises when waiting is pointless (the process that should answer is gone), so a crash at
    start-up fails at once with its own message instead of after `timeout`."""
    started = time.monotonic()
    # Each poll is bounded too: a server that accepts but never answers must not stall the wait.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        while time.monotonic() - started < timeout:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            if alive is not None:
                await alive()
            await asyncio.sleep(interval)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")
