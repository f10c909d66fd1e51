"""Evolution API (the WhatsApp bridge of many self-hosted Chatwoot inboxes) as a local HTTP
server: the presence call the service makes to show "typing..." to the contact."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import orjson
from aiohttp import web

from .standin_server import _json, _StandInServer


@dataclass
class PresenceCall:
    """One accepted ``POST /chat/sendPresence/{instance}``; ``done_at`` is set once Evolution
    answered it (after ``delay``), None while held or when the client gave up on it."""

    at: float
    instance: str
    number: str
    presence: str
    delay: float
    done_at: float | None = None


class EvolutionStandIn(_StandInServer):
    """Evolution API v2's ``POST /chat/sendPresence/{instance}`` (``apikey`` header; body
    ``{number, presence, delay}`` validated as its ``presenceSchema``: all three required,
    presence one of available, unavailable, composing, recording, paused). Like Evolution, the
    request is answered only after ``delay`` ms, the presence shown to the contact meanwhile;
    every accepted call is recorded in :attr:`presence`. :meth:`fail_next` injects errors."""

    PRESENCES = ("available", "unavailable", "composing", "recording", "paused")

    def __init__(self, api_key: str = "evolution-test-key", instance: str = "shop") -> None:
        super().__init__()
        self.api_key = api_key
        self.instance = instance
        self.presence: list[PresenceCall] = []
        self._faults: list[int] = []

    def fail_next(self, n: int, status: int = 500) -> None:
        self._faults.extend([status] * n)

    def presence_for(self, number: str) -> list[str]:
        return [p.presence for p in self.presence if p.number == number]

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/chat/sendPresence/{instance}", self._send_presence)
        return app

    async def _send_presence(self, request: web.Request) -> web.Response:
        if request.headers.get("apikey") != self.api_key:
            return _json({"status": 401, "error": "Unauthorized", "response": {"message": "Unauthorized"}},
                         status=401)
        if request.match_info["instance"] != self.instance:
            return _json({"status": 404, "error": "Not Found", "response": {
                "message": [f'The "{request.match_info["instance"]}" instance does not exist']}},
                status=404)
        if self._faults:
            status = self._faults.pop(0)
            return _json({"status": status, "error": "Injected failure"}, status=status)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("number"), str) \
                or body.get("presence") not in self.PRESENCES \
                or not isinstance(body.get("delay"), int | float) or isinstance(body.get("delay"), bool):
            return _json({"status": 400, "error": "Bad Request",
                          "response": {"message": ["number, presence and delay are required"]}},
                         status=400)
        call = PresenceCall(at=time.time(), instance=self.instance, number=body["number"],
                            presence=body["presence"], delay=body["delay"])
        self.presence.append(call)
        await asyncio.sleep(call.delay / 1000)
        call.done_at = time.time()
        return _json({"presence": call.presence}, status=201)
