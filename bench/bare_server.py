"""The baseline of the ingest benchmark: an aiohttp handler that reads the body and answers 200.

Same framework, same settings (no access log) and same response shape as the service's webhook,
so the ratio measures what storing a message costs; on the event loop EVENT_LOOP picks, as the
service does (buffer_service/eventloop.py), so both sides of a ratio run on the same loop.

With a Redis URL it is the `floor` target instead: the least a handler that stores before it
answers pays on this stack. It parses the body (orjson) and makes one call of a two-command
script (the de-duplication marker and an RPUSH) through the service's own client and batcher
(hiredis packing, calls of one loop iteration in one pipeline), then answers 200; no checks,
no logs, no metrics. What the service costs beyond it is ours to cut; what it costs beyond the
bare handler is aiohttp's and redis-py's.
Run: python bench/bare_server.py PORT [REDIS_URL]
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from buffer_service import eventloop, redis_client
from buffer_service.batcher import ScriptBatcher

_BODY = b'{"status":"ok"}'
# The same key the service's append writes first, so that bench/ingest.py counts what was stored.
_STORE = """redis.call('SET', KEYS[1], 1, 'EX', 86400)
return redis.call('RPUSH', KEYS[2], ARGV[1])"""


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=_BODY, content_type="application/json")


def storing(url: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    redis = redis_client.standalone(url)
    store = ScriptBatcher(redis, redis.register_script(_STORE))

    async def handle_and_store(request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        conversation = payload["conversation"]["id"]
        await store([f"bs:{{s0}}:seen:1:{payload['id']}", f"bs:{{s0}}:floor:{conversation}"],
                     [payload["content"]])
        return web.Response(body=_BODY, content_type="application/json")

    return handle_and_store


def main() -> None:
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/webhooks/chatwoot", storing(sys.argv[2]) if len(sys.argv) > 2 else handle)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                loop=(eventloop.factory(os.environ.get("EVENT_LOOP", "auto")) or asyncio.new_event_loop)())


if __name__ == "__main__":
    main()
