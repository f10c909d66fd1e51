"""The baseline of the ingest benchmark: an aiohttp handler that reads the body and answers 200.

Same framework, same settings (no access log) and same response shape as the service's webhook,
so the ratio measures what storing a message costs; on the event loop EVENT_LOOP picks, as the
service does (buffer_service/eventloop.py), so both sides of a ratio run on the same loop.
Run: python bench/bare_server.py PORT
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiohttp import web

from buffer_service import eventloop

_BODY = b'{"status":"ok"}'


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=_BODY, content_type="application/json")


def main() -> None:
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/webhooks/chatwoot", handle)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                loop=(eventloop.factory(os.environ.get("EVENT_LOOP", "auto")) or asyncio.new_event_loop)())


if __name__ == "__main__":
    main()
