"""What every stand-in server shares: start and stop of an aiohttp app on a free localhost
port, and JSON bodies in and out. Package-private: the stand-in modules import it."""

from __future__ import annotations

import abc
from typing import Any, Self

import orjson
from aiohttp import web


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response encoded with orjson (what the real servers' clients expect)."""
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


async def _object_body(request: web.Request) -> dict[str, Any]:
    """A JSON object body, or {} for anything else (Rails' params are then simply absent)."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


class _StandInServer(abc.ABC):
    """Start/stop of an aiohttp app on an ephemeral localhost port.

    Port 0 lets many stand-ins (parallel tests, benchmarks) run side by side; the real port
    is read back from the listening sockets so callers get a usable base URL.
    """

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None

    @abc.abstractmethod
    def _make_app(self) -> web.Application:
        """The stand-in's routes."""

    @property
    def base_url(self) -> str:
        """The ``http://host:port`` the server listens on; only valid after :meth:`start`."""
        if self._base_url is None:
            raise RuntimeError("stand-in not started")
        return self._base_url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("stand-in already started")
        # access_log=None: benchmarks push thousands of requests; logging each one would
        # dominate the numbers. A short shutdown timeout keeps delayed requests from
        # holding up test teardown.
        runner = web.AppRunner(self._make_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        sock_host, sock_port = runner.addresses[0][:2]
        if ":" in sock_host:
            sock_host = f"[{sock_host}]"
        self._base_url = f"http://{sock_host}:{sock_port}"
        return self._base_url

    async def stop(self) -> None:
        """Stop listening and release the port. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
