"""The event loop a service process runs on: uvloop where it is installed (a dependency on the
platforms it supports), asyncio's own elsewhere or when EVENT_LOOP says so.

uvloop's transports and its loop iteration are written in C on libuv. Measured (BENCHMARKS.md
§1), the webhook rate is within the noise of asyncio's loop on a busy 2-core machine, but the
p99 acknowledgement at half rate is several times lower. Nothing in the service depends on which
loop runs it.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog

from .config import ConfigError

log = structlog.get_logger("buffer_service.eventloop")

T = TypeVar("T")

# The collector's first threshold (CPython's default: 700 container objects allocated net of
# those freed). Under load the live objects of the requests in flight alone cross 700 again and
# again, and every young collection walks all of them, then promotes them, which brings on the
# full collections: measured (BENCHMARKS.md §1), ~40 us of collector time a webhook at the
# defaults. Garbage in cycles waits a few thousand allocations longer to be freed.
_GC_YOUNG_THRESHOLD = 10_000


def factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for EVENT_LOOP `choice` (auto, uvloop, asyncio); None: asyncio's default.
    `uvloop` asked for explicitly and not installed is an error, `auto` falls back quietly."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("EVENT_LOOP=uvloop but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def settle_heap() -> None:
    """Once the modules are imported: what exists by now lives as long as the process, so it is
    frozen out of the full collections (~120k objects they would walk each time), and the young
    generation collected less often (_GC_YOUNG_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, older, oldest)


def run(main: Coroutine[Any, Any, T], loop_factory: Callable[[], asyncio.AbstractEventLoop] | None) -> T:
    """`asyncio.run(main)` on the loop `loop_factory` makes (factory())."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        log.info("event_loop", loop=type(runner.get_loop()).__module__.split(".")[0])
        return runner.run(main)
