"""A Chatwoot account's REST API (what the service calls) and its echo webhook, as a local
HTTP server.

The demo, the tests and the benchmarks run the service against it instead of mocks, so that the
service's aiohttp Chatwoot client exercises its real HTTP code paths: auth header, JSON,
status-code handling. It speaks Chatwoot's wire format (docs/chatwoot.md; Chatwoot's
``app/views/api/v1/models/_message.json.jbuilder``) and records everything it receives, so tests
assert on what the service actually sent. Fault injection (``fail_next``) and latency
(``delay``) because the interesting behaviour of a message buffer is what happens when its
dependencies are slow or failing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .payloads import MESSAGE_TYPE_INTS, message_payload, webhook_headers
from .standin_server import _json, _object_body, _StandInServer

log = logging.getLogger(__name__)


class _ActiveStorage:
    """``ActiveStorage::Blobs::RedirectController`` and ``ActiveStorage::DiskController`` of the
    Chatwoot stand-in (mixed into :class:`ChatwootStandIn`): the two hops a ``data_url`` takes."""

    files: dict[str, StoredFile]
    file_requests: list[FileRequest]
    token: str

    def _record_file_request(self, request: web.Request) -> None:
        self.file_requests.append(FileRequest(
            at=time.time(), path=request.path,
            token_sent=request.headers.get("api_access_token") == self.token))

    async def _blob_redirect(self, request: web.Request) -> web.StreamResponse:
        self._record_file_request(request)
        stored = self.files.get(request.match_info["signed_id"])
        if stored is None:
            return web.Response(status=404, text="Not Found")
        if stored.redirect_to is not None:
            raise web.HTTPFound(stored.redirect_to)
        # Disk service URLs carry the blob key signed with its content type and disposition.
        raise web.HTTPFound(f"/rails/active_storage/disk/{request.match_info['signed_id']}/"
                            f"{stored.filename}?content_type={stored.content_type}&disposition=inline")

    async def _disk_file(self, request: web.Request) -> web.StreamResponse:
        self._record_file_request(request)
        stored = self.files.get(request.match_info["key"])
        if stored is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=stored.data, content_type=stored.content_type, headers={
            "Content-Disposition": f'inline; filename="{stored.filename}"'})


@dataclass
class StoredFile:
    """An attachment's file in the Chatwoot stand-in's storage."""

    data: bytes
    filename: str
    content_type: str
    redirect_to: str | None = None


@dataclass
class FileRequest:
    """One request for an attachment file; ``token_sent``: it carried the API token."""

    at: float
    path: str
    token_sent: bool


@dataclass
class Post:
    """One accepted ``POST …/conversations/{cid}/messages`` (what the service replied)."""

    at: float
    account_id: int
    conversation_id: int
    body: dict[str, Any]
    message_id: int


@dataclass
class RequestRecord:
    """Any request the Chatwoot stand-in saw, including rejected and injected-failure ones.

    ``status`` is 0 when no answer was sent (the request was cancelled).
    """

    at: float
    path: str
    status: int
    method: str = "POST"


@dataclass
class TypingCall:
    """One accepted ``POST …/conversations/{cid}/toggle_typing_status``."""

    at: float
    account_id: int
    conversation_id: int
    status: str  # on, off, recording
    private: bool


@dataclass
class StatusChange:
    """One accepted ``POST …/conversations/{cid}/toggle_status``."""

    at: float
    conversation_id: int
    status: str
    updated_at: float  # the conversation's `updated_at` after the change


@dataclass
class Echo:
    """Outcome of one webhook delivery attempt (an echo, or :meth:`ChatwootStandIn.deliver`);
    ``status`` is None when it raised (no answer: refused, or past the 5 s timeout)."""

    at: float
    message_id: int
    status: int | None
    error: str | None = None
    attempt: int = 1


# lib/webhooks/trigger.rb: the only answers after which an agent bot's job is performed again;
# app/jobs/agent_bots/webhook_job.rb: `retry_on RetryableError, wait: 3.seconds, attempts: 3`.
RETRYABLE_AGENT_BOT_STATUSES = frozenset({429, 500})
AGENT_BOT_ATTEMPTS = 3


class ChatwootStandIn(_ActiveStorage, _StandInServer):
    """A Chatwoot account's REST API for sending replies, plus the echo webhook.

    Serves ``POST /api/v1/accounts/{account_id}/conversations/{conversation_id}/messages``
    with Chatwoot's auth (``api_access_token`` header), validation and response shape
    (``_message.json.jbuilder``: integer ``message_type``, Unix ``created_at``). Real
    Chatwoot fires ``message_created`` for the bot's own replies; setting
    ``echo_webhook_url`` reproduces that so loop prevention is tested end to end.

    Also serves what a retry asks to learn whether an earlier post went through:
    ``GET …/conversations/{cid}/messages?after=<id>`` (``{meta, payload}``, up to 100 newer
    messages, oldest first; 401 for an agent bot's token, as Chatwoot answers) and
    ``GET …/conversations/{cid}`` (its ``last_non_activity_message``).

    Test knobs: :meth:`fail_next`, :attr:`delay`, :attr:`conversation_status` (status put in
    echoes), :attr:`echo_secret` (sign echoes like Chatwoot v4.13+ agent bots),
    :attr:`bot_token` (the token may not list messages), :meth:`slow_next` and
    :attr:`slow_share` (such posts are created, then answered only after
    :attr:`slow_answer_s`, and no echo is sent for them: a Chatwoot too busy to answer in time),
    :meth:`late_next` (such posts are created only after a while, whether or not the client is
    still waiting: a request queued behind a busy Rails).

    :meth:`deliver` sends a webhook (a customer's message) the way Chatwoot's jobs do, with
    their retry policy; :attr:`webhook_retry_s` shortens the 3 s between an agent bot's attempts.
    """

    def __init__(
        self,
        token: str = "chatwoot-test-token",
        *,
        echo_webhook_url: str | None = None,
        echo_secret: str | None = None,
        bot_id: int = 1,
        bot_name: str = "BufferBot",
        inbox_id: int = 1,
        first_message_id: int = 500000,
    ) -> None:
        super().__init__()
        self.token = token
        self.echo_webhook_url = echo_webhook_url
        self.echo_secret = echo_secret
        self.bot_id = bot_id
        self.bot_name = bot_name
        self.inbox_id = inbox_id
        #: Conversation status reported in echo webhooks.
        self.conversation_status = "pending"
        #: Seconds between an agent bot's delivery attempts (Chatwoot: 3).
        self.webhook_retry_s = 3.0
        #: Every attempt of :meth:`deliver`, in order.
        self.deliveries: list[Echo] = []
        #: Seconds to wait before answering any request.
        self.delay: float = 0.0
        #: The token is an agent bot's: listing messages and toggling typing answer 401.
        self.bot_token = False
        #: Share of posts (0..1, drawn from :attr:`rng`) answered only after ``slow_answer_s``,
        #: created all the same, with no echo.
        self.slow_share = 0.0
        self.slow_answer_s = 0.0
        #: Seconds a typing toggle is held before it is answered (and recorded).
        self.typing_delay = 0.0
        #: HTTP statuses the next typing toggles answer with (:meth:`fail_next` spares them).
        self.typing_faults: list[int] = []
        self.rng = random.Random(0)
        self._slow = 0
        self._late: list[float] = []
        #: Messages created through the API, per conversation, as the REST API renders them.
        self.messages: dict[int, list[dict[str, Any]]] = {}
        self.posts: list[Post] = []
        self.typing: list[TypingCall] = []
        self.status_changes: list[StatusChange] = []
        #: Per conversation: its status and `updated_at` once the API changed them.
        self.statuses: dict[int, str] = {}
        self.updated_at: dict[int, float] = {}
        self.requests: list[RequestRecord] = []
        self.echoes: list[Echo] = []
        self._ids = itertools.count(first_message_id)
        self._faults: list[int] = []
        self._echo_tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        #: Attachment files by ActiveStorage signed id (:meth:`add_file`); who fetched them.
        self.files: dict[str, StoredFile] = {}
        self.file_requests: list[FileRequest] = []

    # -- test knobs ------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` requests with ``status`` and a JSON error; no post recorded."""
        self._faults.extend([status] * n)

    def slow_next(self, n: int, answer_s: float) -> None:
        """Create the next ``n`` posted messages but answer each only after ``answer_s``, with
        no echo."""
        self._slow += n
        self.slow_answer_s = answer_s

    def late_next(self, n: int, create_after_s: float) -> None:
        """Create each of the next ``n`` posted messages only ``create_after_s`` after the post
        arrived (then answer it, if the client still waits, and echo it)."""
        self._late.extend([create_after_s] * n)

    def reset(self) -> None:
        """Forget recorded posts, requests, echoes and pending faults."""
        self.posts.clear()
        self.typing.clear()
        self.status_changes.clear()
        self.requests.clear()
        self.echoes.clear()
        self.deliveries.clear()
        self.messages.clear()
        self._faults.clear()

    def posts_for(self, conversation_id: int) -> list[Post]:
        """Accepted posts for one conversation, in arrival order."""
        return [p for p in self.posts if p.conversation_id == conversation_id]

    def add_file(self, data: bytes, filename: str, content_type: str, *,
                 redirect_to: str | None = None) -> str:
        """Store an attachment's file as Chatwoot's ActiveStorage does; returns its ``data_url``.

        The URL is the blob *redirect* route of Rails (``/rails/active_storage/blobs/redirect/
        <signed id>/<filename>``), which answers 302 to the storage service: here the disk
        service of the same server (``/rails/active_storage/disk/<key>/<filename>``) that
        serves the bytes, or ``redirect_to`` (an S3-like URL elsewhere, or a hostile target).
        """
        signed_id = base64.urlsafe_b64encode(orjson.dumps({"_rails": {"data": len(self.files) + 1,
                                                                      "pur": "blob_id"}})).decode()
        signed_id = signed_id.rstrip("=") + "--" + uuid.uuid4().hex[:40]
        self.files[signed_id] = StoredFile(data, filename, content_type, redirect_to)
        return f"{self.base_url}/rails/active_storage/blobs/redirect/{signed_id}/{filename}"

    async def wait_echoes(self) -> None:
        """Wait until every echo delivery started so far has finished."""
        while self._echo_tasks:
            await asyncio.gather(*list(self._echo_tasks), return_exceptions=True)

    # -- server ----------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        conversation = "/api/v1/accounts/{account_id:\\d+}/conversations/{conversation_id:\\d+}"
        app.router.add_post(conversation + "/messages", self._create_message)
        app.router.add_get(conversation + "/messages", self._list_messages)
        app.router.add_get(conversation, self._show_conversation)
        app.router.add_post(conversation + "/toggle_typing_status", self._toggle_typing)
        app.router.add_post(conversation + "/toggle_status", self._toggle_status)
        app.router.add_get("/rails/active_storage/blobs/redirect/{signed_id}/{filename}",
                           self._blob_redirect)
        app.router.add_get("/rails/active_storage/disk/{key}/{filename}", self._disk_file)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving; also opens the client session used for echo webhooks."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            return await super().start(host, port)
        except BaseException:
            await self._session.close()
            self._session = None
            raise

    async def stop(self) -> None:
        """Stop serving, cancel in-flight echo deliveries and close their session."""
        await super().stop()
        for task in list(self._echo_tasks):
            task.cancel()
        await asyncio.gather(*list(self._echo_tasks), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @web.middleware
    async def _middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Apply delay and injected faults to every request, and record all of them; typing
        toggles apart (their own knobs and record), as they run beside the other calls."""
        if request.path.endswith("/toggle_typing_status"):
            return await handler(request)
        at = time.time()
        status = 0  # stays 0 if the request is cancelled (client gone, server stopping)
        try:
            if self.delay > 0:
                await asyncio.sleep(self.delay)
            if self._faults:
                status = self._faults.pop(0)
                return _json({"error": f"Injected failure (HTTP {status})"}, status=status)
            try:
                resp = await handler(request)
            except web.HTTPException as exc:
                status = exc.status
                raise
            except Exception:
                status = 500
                raise
            status = resp.status
            return resp
        finally:
            self.requests.append(RequestRecord(at=at, path=request.path, status=status,
                                               method=request.method))

    async def _create_message(self, request: web.Request) -> web.StreamResponse:
        """``Api::V1::Accounts::Conversations::MessagesController#create``."""
        at = time.time()
        if not self._authorized(request):
            return _json({"error": "Invalid Access Token"}, status=401)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json({"error": "Invalid JSON body"}, status=422)
        if not isinstance(body, dict) or not isinstance(body.get("content"), str):
            return _json({"error": "param is missing or the value is empty: content"}, status=422)

        account_id = int(request.match_info["account_id"])
        conversation_id = int(request.match_info["conversation_id"])
        if self._late:
            await asyncio.sleep(self._late.pop(0))
            at = time.time()
        message_id = next(self._ids)
        private = bool(body.get("private", False))
        message_type = body.get("message_type", "outgoing")
        if message_type not in MESSAGE_TYPE_INTS:
            message_type = "outgoing"
        content_attributes = body.get("content_attributes")
        if not isinstance(content_attributes, dict):
            content_attributes = {}
        message = {
            "id": message_id,
            "content": body["content"],
            "inbox_id": self.inbox_id,
            "conversation_id": conversation_id,
            "message_type": MESSAGE_TYPE_INTS[message_type],
            "content_type": body.get("content_type") or "text",
            "status": "sent",
            "content_attributes": content_attributes,
            "created_at": int(at),
            "private": private,
            "source_id": None,
            "sender": {
                "id": self.bot_id,
                "name": self.bot_name,
                "avatar_url": "",
                "type": "agent_bot",
            },
        }
        self.posts.append(
            Post(
                at=at,
                account_id=account_id,
                conversation_id=conversation_id,
                body=body,
                message_id=message_id,
            )
        )
        self.messages.setdefault(conversation_id, []).append(message)
        resp = _json(message)
        if self._slow or (self.slow_share and self.rng.random() < self.slow_share):
            self._slow = max(0, self._slow - 1)
            await asyncio.sleep(self.slow_answer_s)
            return resp
        if self.echo_webhook_url is None:
            return resp
        # Like Chatwoot, the message_created event is dispatched after the request that
        # created the message completed: flush the response before starting the echo. The
        # message exists even if the client went away meanwhile, and so does its event.
        with contextlib.suppress(ConnectionError):
            await resp.prepare(request)
            await resp.write_eof()
        echo = message_payload(
            message_id=message_id,
            conversation_id=conversation_id,
            content=body["content"],
            account_id=account_id,
            inbox_id=self.inbox_id,
            message_type=message_type,
            private=private,
            status=self.conversation_status,
            sender_type="agent_bot",
            sender_id=self.bot_id,
            sender_name=self.bot_name,
            assignee={
                "id": self.bot_id,
                "name": self.bot_name,
                "avatar_url": "",
                "type": "agent_bot",
            },
            created_at=datetime.fromtimestamp(at, UTC),
        )
        task = asyncio.create_task(self._deliver_echo(self.echo_webhook_url, echo))
        self._echo_tasks.add(task)
        task.add_done_callback(self._echo_tasks.discard)
        return resp

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("api_access_token") == self.token

    async def _toggle_typing(self, request: web.Request) -> web.Response:
        """``ConversationsController#toggle_typing_status``: ``typing_status`` on, off or
        recording (``is_private``: shown to agents only); answers an empty 200."""
        if not self._authorized(request):
            return _json({"error": "Invalid Access Token"}, status=401)
        if self.bot_token:
            return _json({"error": "Access to this endpoint is not authorized for bots"}, status=401)
        if self.typing_faults:
            return _json({"error": "Injected failure"}, status=self.typing_faults.pop(0))
        body = await _object_body(request)
        status = body.get("typing_status")
        if status not in ("on", "off", "recording"):
            return _json({"error": "typing_status must be on, off or recording"}, status=422)
        if self.typing_delay > 0:
            await asyncio.sleep(self.typing_delay)
        self.typing.append(TypingCall(
            at=time.time(), account_id=int(request.match_info["account_id"]),
            conversation_id=int(request.match_info["conversation_id"]), status=status,
            private=bool(body.get("is_private", False))))
        return web.Response(status=200)

    async def _toggle_status(self, request: web.Request) -> web.Response:
        """``ConversationsController#toggle_status`` with ``status`` (open, resolved, pending,
        snoozed); an agent bot's token may call it (its handoff is ``open``)."""
        if not self._authorized(request):
            return _json({"error": "Invalid Access Token"}, status=401)
        status = (await _object_body(request)).get("status")
        if status not in ("open", "resolved", "pending", "snoozed"):
            return _json({"error": "status must be open, resolved, pending or snoozed"}, status=422)
        conversation_id = int(request.match_info["conversation_id"])
        self.statuses[conversation_id] = status
        self.updated_at[conversation_id] = round(time.time(), 6)  # Rails keeps microseconds
        self.status_changes.append(StatusChange(time.time(), conversation_id, status,
                                                self.updated_at[conversation_id]))
        return _json({"meta": {}, "payload": {"success": True, "current_status": status,
                                              "conversation_id": conversation_id}})

    def notes_for(self, conversation_id: int) -> list[str]:
        """Private notes posted in one conversation."""
        return [p.body["content"] for p in self.posts_for(conversation_id) if p.body.get("private")]

    def typing_for(self, conversation_id: int) -> list[str]:
        """The typing states the bot set in one conversation, in order."""
        return [t.status for t in self.typing if t.conversation_id == conversation_id]

    async def _list_messages(self, request: web.Request) -> web.Response:
        """``MessagesController#index``: ``after`` gives up to 100 newer messages, ascending."""
        if not self._authorized(request):
            return _json({"error": "Invalid Access Token"}, status=401)
        if self.bot_token:
            return _json({"error": "Access to this endpoint is not authorized for bots"}, status=401)
        messages = self.messages.get(int(request.match_info["conversation_id"]), [])
        after = request.query.get("after")
        if after is not None and after.isdigit():
            page = [m for m in messages if m["id"] > int(after)][:100]
        else:
            page = messages[-20:]
        return _json({"meta": {}, "payload": page})

    async def _show_conversation(self, request: web.Request) -> web.Response:
        """``ConversationsController#show``, the fields a retry reads."""
        if not self._authorized(request):
            return _json({"error": "Invalid Access Token"}, status=401)
        conversation_id = int(request.match_info["conversation_id"])
        messages = self.messages.get(conversation_id, [])
        return _json({"id": conversation_id, "inbox_id": self.inbox_id,
                      "status": self.statuses.get(conversation_id, self.conversation_status),
                      "updated_at": self.updated_at.get(conversation_id, 0.0),
                      "last_non_activity_message": messages[-1] if messages else None})

    async def deliver(self, url: str, payload: dict[str, Any], *, agent_bot: bool = True) -> int | None:
        """Deliver one webhook as Chatwoot does (``lib/webhooks/trigger.rb``): POST, 5 s timeout,
        signed with :attr:`echo_secret`, success is a 2xx. An agent bot's job is performed again
        after :attr:`webhook_retry_s` only when the answer was 429 or 500, 3 attempts in all
        (same ``X-Chatwoot-Delivery``); a timeout, a refused connection, any other status is
        final at once. An account webhook (``agent_bot=False``) is delivered once. When an agent
        bot's delivery of ``message_created``/``message_updated`` finally fails, a ``pending``
        conversation becomes ``open``: Chatwoot hands it to humans. Returns the last answer's
        status (None: no answer); every attempt is in :attr:`deliveries`."""
        delivery = str(uuid.uuid4())
        attempts = AGENT_BOT_ATTEMPTS if agent_bot else 1
        status: int | None = None
        for attempt in range(1, attempts + 1):
            at = time.time()
            status, error = await self._post_webhook(url, payload, delivery)
            self.deliveries.append(Echo(at, payload.get("id", 0), status, error, attempt))
            if status is not None and 200 <= status < 300:
                return status
            if not agent_bot or status not in RETRYABLE_AGENT_BOT_STATUSES or attempt == attempts:
                break
            await asyncio.sleep(self.webhook_retry_s)
        conversation_id = (payload.get("conversation") or {}).get("id")
        if agent_bot and payload.get("event") in ("message_created", "message_updated") \
                and conversation_id is not None \
                and self.statuses.get(conversation_id, self.conversation_status) == "pending":
            self.statuses[conversation_id] = "open"
            self.updated_at[conversation_id] = round(time.time(), 6)
        return status

    async def _deliver_echo(self, url: str, payload: dict[str, Any]) -> None:
        """POST one webhook like ``Webhooks::Trigger`` for an account webhook: no retry."""
        at = time.time()
        status, error = await self._post_webhook(url, payload, str(uuid.uuid4()))
        self.echoes.append(Echo(at=at, message_id=payload["id"], status=status, error=error))

    async def _post_webhook(self, url: str, payload: dict[str, Any],
                            delivery: str) -> tuple[int | None, str | None]:
        """One POST of a webhook: its answer's status, or None and the error (logged)."""
        raw = orjson.dumps(payload)
        headers = webhook_headers(raw, self.echo_secret)
        headers["X-Chatwoot-Delivery"] = delivery
        try:
            if self._session is None:
                raise RuntimeError("stand-in stopped")
            async with self._session.post(url, data=raw, headers=headers) as resp:
                await resp.read()
                return resp.status, None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Chatwoot logs a failed delivery
            log.warning("webhook to %s failed: %r", url, exc)
            return None, repr(exc)
