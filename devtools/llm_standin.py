"""An OpenAI-compatible LLM server (chat completions, transcriptions, models) as a local HTTP
server.

The official ``openai`` client of the service talks to it over HTTP, so its real code paths run:
auth header, request and response bodies, the SDK's error mapping and retries. Replies are
deterministic and every request is recorded, so tests assert on what the service sent to the
model; fault injection and latency as in the other stand-ins.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .standin_server import _json, _StandInServer


@dataclass
class LLMCall:
    """One chat-completions request; ``status`` is 0 while it is still being answered."""

    at: float
    model: str | None
    messages: list[dict[str, Any]]
    reply: str | None
    status: int
    #: The ``image_url`` URLs of the request's content parts, in order (data URIs or URLs).
    images: list[str] = field(default_factory=list)
    #: The names of the function tools the request offered.
    tools: list[str] = field(default_factory=list)
    #: The tool calls answered: ``{"name", "arguments"}`` (arguments as JSON text).
    tool_calls: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Transcription:
    """One ``POST /v1/audio/transcriptions``; ``done_at`` is 0 while it is being answered."""

    at: float
    model: str | None
    filename: str | None
    content_type: str | None
    size: int
    status: int = 0
    done_at: float = 0.0


def _image_urls(messages: list[dict[str, Any]]) -> list[str]:
    return [str(part.get("image_url", {}).get("url", "")) for m in messages
            if isinstance(m.get("content"), list) for part in m["content"]
            if isinstance(part, dict) and part.get("type") == "image_url"
            and isinstance(part.get("image_url"), dict)]


def text_of(content: Any) -> str:
    """Text of a message ``content``: a string, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def default_reply(messages: list[dict[str, Any]]) -> str:
    """``"Reply to: a | b"`` for the trailing run of ``user`` messages.

    Deterministic and derived from exactly the batch the service flushed, so tests can
    assert which fragments were combined into one LLM call just by reading the reply.
    """
    tail: list[str] = []
    for msg in reversed(messages):
        if msg.get("role") != "user":
            break
        tail.append(text_of(msg.get("content")))
    return "Reply to: " + " | ".join(reversed(tail))


def _count_tokens(text: str) -> int:
    """Rough token count (words); enough for usage accounting in tests."""
    return len(text.split())


_OPENAI_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Bad request", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to access this resource.", "invalid_request_error", None),
    404: ("The model does not exist.", "invalid_request_error", "model_not_found"),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


def _openai_error(
    status: int,
    message: str | None = None,
    *,
    type_: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> web.Response:
    """An error response in OpenAI's ``{"error": {message, type, param, code}}`` shape."""
    d_msg, d_type, d_code = _OPENAI_ERRORS.get(status, (f"HTTP {status}", "server_error", None))
    headers = {"retry-after": "0"} if status == 429 else None
    err = {
        "message": message or d_msg,
        "type": type_ or d_type,
        "param": param,
        "code": code if code is not None else d_code,
    }
    return _json({"error": err}, status=status, headers=headers)


class LLMStandIn(_StandInServer):
    """An OpenAI-compatible server (``/v1/chat/completions``, ``/v1/audio/transcriptions``,
    ``/v1/models``).

    Replies are deterministic (:attr:`reply_fn`, replaceable by tests) and every request is
    recorded in :attr:`calls`, so tests see exactly what the service sent to the model.
    :meth:`fail_next` and :attr:`delay` apply to chat completions only; ``/v1/models``
    stays healthy so readiness checks are not affected. Point ``openai.AsyncOpenAI`` at
    ``base_url + "/v1"``.
    """

    def __init__(self, api_key: str = "llm-test-key", *, model: str = "stand-in-model") -> None:
        super().__init__()
        self.api_key = api_key
        self.model = model
        #: Produces the assistant reply from the request's ``messages``.
        self.reply_fn: Callable[[list[dict[str, Any]]], str] = default_reply
        #: Tool calls the model makes, from the request's messages: ``{"name", "arguments"}``
        #: (arguments a dict, or a str sent as it is), answered only for tools the request
        #: offered. With tool calls, an empty reply from :attr:`reply_fn` is no text (null).
        self.tool_calls_fn: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] = lambda _: []
        #: Seconds to wait before answering a chat completion.
        self.delay: float = 0.0
        self.calls: list[LLMCall] = []
        self._faults: list[int] = []
        #: A model without image input: chat requests with image parts get OpenAI's 400.
        self.refuse_images = False
        #: Produces a transcript from the audio file's bytes and name; by default the file's
        #: bytes read as UTF-8 text, so a test's "voice note" says what its bytes say.
        self.transcribe_fn: Callable[[bytes, str], str] = (
            lambda data, name: data.decode("utf-8", "replace").strip())
        #: Seconds a transcription takes.
        self.transcription_delay: float = 0.0
        self.transcriptions: list[Transcription] = []
        self._transcription_faults: list[int] = []

    def fail_transcriptions(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` transcriptions with ``status`` in OpenAI's error shape."""
        self._transcription_faults.extend([status] * n)

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` chat completions with ``status`` in OpenAI's error shape."""
        self._faults.extend([status] * n)

    def reset(self) -> None:
        """Forget recorded calls and pending faults."""
        self.calls.clear()
        self._faults.clear()

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        return app

    async def _transcriptions(self, request: web.Request) -> web.Response:
        """``POST /v1/audio/transcriptions``: multipart/form-data with ``file`` (name and type
        on the part) and ``model``, as the ``openai`` client sends it; answers ``{"text"}``
        (``response_format`` json, the default) or the bare text (``text``)."""
        record = Transcription(at=time.time(), model=None, filename=None, content_type=None, size=0)
        self.transcriptions.append(record)
        try:
            resp = await self._transcribe(request, record)
        finally:
            record.done_at = time.time()
        record.status = resp.status
        return resp

    async def _transcribe(self, request: web.Request, record: Transcription) -> web.Response:
        if not self._authorized(request):
            return _openai_error(401)
        if not request.content_type.startswith("multipart/form-data"):
            return _openai_error(400, "Expected multipart/form-data", param="file")
        fields: dict[str, str] = {}
        audio = b""
        async for part in await request.multipart():
            if not isinstance(part, aiohttp.BodyPartReader):
                continue
            if part.name == "file":
                record.filename = part.filename
                record.content_type = part.headers.get(aiohttp.hdrs.CONTENT_TYPE)
                audio = await part.read()
                record.size = len(audio)
            elif part.name:
                fields[part.name] = (await part.read()).decode("utf-8", "replace")
        record.model = fields.get("model")
        if self.transcription_delay > 0:
            await asyncio.sleep(self.transcription_delay)
        if self._transcription_faults:
            return _openai_error(self._transcription_faults.pop(0))
        if not record.model:
            return _openai_error(400, "you must provide a model parameter", param="model")
        if not audio or not record.filename:
            return _openai_error(400, "Audio file might be corrupted or unsupported",
                                 param="file", code="invalid_value")
        text = self.transcribe_fn(audio, record.filename)
        if fields.get("response_format") == "text":
            return web.Response(text=text + "\n", content_type="text/plain")
        return _json({"text": text, "usage": {"type": "duration", "seconds": max(1, len(audio) // 4000)}},
                     headers={"x-request-id": "req_" + uuid.uuid4().hex})

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _openai_error(401)
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model,
                        "object": "model",
                        "created": 1700000000,
                        "owned_by": "buffer-service",
                    }
                ],
            }
        )

    async def _chat_completions(self, request: web.Request) -> web.Response:
        """``POST /v1/chat/completions`` (non-streaming)."""
        call = LLMCall(at=time.time(), model=None, messages=[], reply=None, status=0)
        self.calls.append(call)
        resp = await self._answer(request, call)
        call.status = resp.status
        return resp

    async def _answer(self, request: web.Request, call: LLMCall) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict):
            call.model = body.get("model") if isinstance(body.get("model"), str) else None
            msgs = body.get("messages")
            if isinstance(msgs, list):
                call.messages = [m for m in msgs if isinstance(m, dict)]
                call.images = _image_urls(call.messages)
            tools = body.get("tools")
            call.tools = [t["function"]["name"] for t in tools
                          if isinstance(t, dict) and t.get("type") == "function"
                          and isinstance(t.get("function"), dict)
                          and isinstance(t["function"].get("name"), str)] \
                if isinstance(tools, list) else []
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        if self._faults:
            return _openai_error(self._faults.pop(0))
        if self.refuse_images and call.images:
            return _openai_error(400, "Invalid content type. image_url is only supported by certain "
                                 "models.", param="messages.[1].content.[1].type")
        if not self._authorized(request):
            return _openai_error(401)
        if not isinstance(body, dict):
            return _openai_error(400, "We could not parse the JSON body of your request.")
        if body.get("stream"):
            return _openai_error(
                400, "Streaming is not supported by this stand-in.", param="stream"
            )
        if call.model is None:
            return _openai_error(400, "you must provide a model parameter", param="model")
        if not isinstance(body.get("messages"), list) or not call.messages:
            return _openai_error(400, "'messages' must be a non-empty array", param="messages")

        reply = self.reply_fn(call.messages)
        call.reply = reply
        call.tool_calls = [
            {"name": c["name"], "arguments": c["arguments"] if isinstance(c["arguments"], str)
             else orjson.dumps(c["arguments"]).decode()}
            for c in self.tool_calls_fn(call.messages) if c["name"] in call.tools]
        prompt_tokens = sum(_count_tokens(text_of(m.get("content"))) for m in call.messages)
        completion_tokens = _count_tokens(reply) + sum(
            _count_tokens(c["arguments"]) for c in call.tool_calls)
        message: dict[str, Any] = {
            "role": "assistant", "content": (reply or None) if call.tool_calls else reply,
            "refusal": None, "annotations": []}
        if call.tool_calls:
            message["tool_calls"] = [
                {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                 "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in call.tool_calls]
        return _json(
            {
                "id": "chatcmpl-" + uuid.uuid4().hex[:24],
                "object": "chat.completion",
                "created": int(time.time()),
                "model": call.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if call.tool_calls else "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
                "system_fingerprint": None,
            },
            headers={"x-request-id": "req_" + uuid.uuid4().hex},
        )
