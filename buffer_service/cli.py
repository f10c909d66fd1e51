"""The `buffer-service` command: run the server and/or the worker.

    buffer-service serve              HTTP server and worker in one process
    buffer-service serve --no-worker  HTTP server only (scale webhooks apart from LLM work)
    buffer-service worker             worker only
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import logs
from .config import ConfigError, Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="buffer-service",
        description="Buffer bursts of Chatwoot WhatsApp messages in Redis; answer each burst once.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server (and, by default, a worker)")
    serve.add_argument("--no-worker", action="store_true",
                       help="only take webhooks; run `buffer-service worker` elsewhere")
    sub.add_parser("worker", help="run a worker only: flush due buffers, ask the LLM, reply")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "worker" or not args.no_worker:
            settings.require_worker()
    except ConfigError as exc:
        print(f"buffer-service: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)

    from . import service

    http = args.command == "serve"
    worker = args.command == "worker" or not args.no_worker
    try:
        asyncio.run(service.run(settings, http=http, worker=worker))
    except OSError as exc:  # e.g. the port is taken
        print(f"buffer-service: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
