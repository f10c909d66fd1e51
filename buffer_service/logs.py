"""structlog set-up: JSON lines by default (for log shippers), a console view when asked.

Context such as the conversation and batch ids is bound per task with contextvars, so every
line a batch produces carries them without threading a logger through every call.

JSON lines are written by _TurnLines: the lines the event loop produces in one turn go out in
one write at the start of the next (a webhook logs one line; under load a turn answers dozens).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
from typing import Any, BinaryIO

import orjson
import structlog


class _TurnLines:
    """structlog's logger for rendered JSON lines (bytes). In a running event loop a line waits
    for the end of the loop's turn and the turn's lines are written together, in order: one
    write() instead of one per line. Anywhere else (no loop, another thread) it is written at
    once, after any that wait. Lines still waiting when the process exits are written then."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._waiting: list[bytes] = []
        self._lock = threading.Lock()
        atexit.register(self.flush)

    def msg(self, line: bytes) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._waiting.append(line)
            if loop is not None and len(self._waiting) > 1:
                return  # the turn's first line scheduled the write
        if loop is None:
            self.flush()
        else:
            loop.call_soon(self.flush)

    log = debug = info = warn = warning = err = error = critical = exception = failure = fatal = msg

    def flush(self) -> None:
        with self._lock:
            lines, self._waiting = self._waiting, []
            if lines:
                lines.append(b"")
                self._out.write(b"\n".join(lines))
                self._out.flush()


def configure(fmt: str = "json", level: str = "info") -> None:
    renderer: structlog.typing.Processor
    factory: Any
    out = getattr(sys.stderr, "buffer", None)  # none when something replaced stderr with text only
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    elif out is None:
        renderer = structlog.processors.JSONRenderer(serializer=lambda o, **_: orjson.dumps(o).decode())
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        sys.stderr.flush()  # what was printed before goes out before the first line
        lines = _TurnLines(out)
        factory = lambda *_: lines  # noqa: E731 - one writer for every logger
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    # aiohttp's access log is one line per webhook; the handler logs its outcome already.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
