"""structlog set-up: JSON lines by default (for log shippers), a console view when asked.

Context such as the conversation and batch ids is bound per task with contextvars, so every
line a batch produces carries them without threading a logger through every call.
"""

from __future__ import annotations

import logging
import sys

import orjson
import structlog


def configure(fmt: str = "json", level: str = "info") -> None:
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=lambda o, **_: orjson.dumps(o).decode())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # aiohttp's access log is one line per webhook; the handler logs its outcome already.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
