"""Local HTTP stand-ins for Chatwoot and an OpenAI-compatible LLM server.

The demo, the tests and the benchmarks run the service against these instead of mocks so
that the real clients (``openai.AsyncOpenAI`` and the service's aiohttp Chatwoot client)
exercise their real HTTP code paths: auth headers, JSON (de)serialisation, status-code
handling and the OpenAI SDK's own retry logic. Both servers speak the wire formats of the
real products (see ``docs/chatwoot.md`` and Chatwoot's
``app/views/api/v1/models/_message.json.jbuilder``) and record everything they receive so
tests can assert on what the service actually sent.

Both offer fault injection (``fail_next``) and latency (``delay``) because the interesting
behaviour of a message buffer is what happens when its dependencies are slow or failing.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

import aiohttp
import orjson
from aiohttp import web

__all__ = [
    "MESSAGE_TYPE_INTS",
    "ChatwootStandIn",
    "Echo",
    "LLMCall",
    "LLMStandIn",
    "Post",
    "RequestRecord",
    "StoredFile",
    "Transcription",
    "attachment",
    "default_reply",
    "iso_ms",
    "message_payload",
    "webhook_headers",
]

log = logging.getLogger(__name__)

#: Chatwoot's ``Message.message_type`` enum. Webhooks carry the name, the REST API and the
#: push-format message inside ``conversation.messages`` carry the integer.
MESSAGE_TYPE_INTS: dict[str, int] = {"incoming": 0, "outgoing": 1, "activity": 2, "template": 3}

_ACCOUNT_NAME = "Loja Acme"
_INBOX_NAME = "WhatsApp Vendas"
_DEFAULT_CONTACT_NAME = "Maria Souza"

# Attachment ids only need to be unique within a test run; a process-wide counter does that.
_attachment_ids = itertools.count(7000)


# --------------------------------------------------------------------------------------------
# Webhook payload builders
# --------------------------------------------------------------------------------------------


def iso_ms(dt: datetime) -> str:
    """Render ``dt`` the way ActiveSupport serialises a ``TimeWithZone`` in webhooks.

    Chatwoot's message ``created_at`` is ISO-8601 in UTC with exactly three fractional
    digits and a ``Z`` suffix (chatwoot.md §3.1); parsers in the service must cope with
    precisely this form, so the stand-in must produce precisely this form. Naive datetimes
    are taken to be UTC.
    """
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _phone_for(contact_id: int) -> str:
    """A deterministic Brazilian mobile number for a contact, in Chatwoot's ``+E.164`` form."""
    return f"+5511{900000000 + contact_id % 100000000}"


def attachment(file_type: str, **extra: Any) -> dict[str, Any]:
    """Build one ``attachments[]`` element as ``Attachment#push_event_data`` renders it.

    The field set depends on ``file_type`` (chatwoot.md §3.4) and the service's media
    handling branches on exactly those fields, so tests get realistic defaults for each
    type. ``message_id`` and ``account_id`` are left ``None`` for :func:`message_payload`
    to fill in; anything in ``extra`` overrides the defaults (e.g. ``data_url=...``).
    """
    att_id = extra.pop("id", None)
    data: dict[str, Any] = {
        "id": att_id if att_id is not None else next(_attachment_ids),
        "message_id": None,
        "file_type": file_type,
        "account_id": None,
    }
    base_url = "https://chatwoot.example.com/rails/active_storage/blobs/redirect"
    if file_type in ("image", "video", "file", "audio"):
        ext, mime = {
            "image": ("jpg", "image/jpeg"),
            "video": ("mp4", "video/mp4"),
            "file": ("pdf", "application/pdf"),
            "audio": ("ogg", "audio/ogg"),
        }[file_type]
        data.update(
            extension=ext,
            content_type=mime,
            data_url=f"{base_url}/{data['id']}/file.{ext}",
            thumb_url=f"{base_url}/{data['id']}/thumb.{ext}" if file_type == "image" else "",
            file_size=12345,
            width=800 if file_type in ("image", "video") else None,
            height=600 if file_type in ("image", "video") else None,
        )
        if file_type == "audio":
            data["transcribed_text"] = ""
    elif file_type == "location":
        data.update(
            coordinates_lat=-23.5505,
            coordinates_long=-46.6333,
            fallback_title="Avenida Paulista, 1000, São Paulo",
            data_url="https://maps.google.com/?q=-23.5505,-46.6333",
        )
    elif file_type == "contact":
        data.update(
            fallback_title="+5511912345678", meta={"firstName": "João", "lastName": "Silva"}
        )
    elif file_type in ("fallback", "embed"):
        data.update(fallback_title="Shared link", data_url="https://example.com/")
    data.update(extra)
    return data


def _contact_webhook_data(contact_id: int, name: str, account_id: int) -> dict[str, Any]:
    """``Contact#webhook_data``: the incoming-message sender. It has no ``type`` key."""
    return {
        "account": {"id": account_id, "name": _ACCOUNT_NAME},
        "additional_attributes": {},
        "avatar": "",
        "custom_attributes": {},
        "email": None,
        "id": contact_id,
        "identifier": None,
        "name": name,
        "phone_number": _phone_for(contact_id),
        "thumbnail": "",
        "blocked": False,
    }


def _contact_push_data(contact_id: int, name: str) -> dict[str, Any]:
    """``Contact#push_event_data`` (trimmed): used in ``meta.sender`` and push messages."""
    return {
        "additional_attributes": {},
        "custom_attributes": {},
        "email": None,
        "id": contact_id,
        "identifier": None,
        "name": name,
        "phone_number": _phone_for(contact_id),
        "thumbnail": "",
        "type": "contact",
    }


def message_payload(
    *,
    message_id: int,
    conversation_id: int,
    content: str | None = "hi",
    account_id: int = 1,
    inbox_id: int = 1,
    message_type: str = "incoming",
    private: bool = False,
    status: str = "pending",
    event: str = "message_created",
    sender_type: str | None = None,
    sender_id: int = 1,
    sender_name: str = _DEFAULT_CONTACT_NAME,
    attachments: list[dict[str, Any]] | None = None,
    assignee: dict[str, Any] | None = None,
    created_at: datetime | None = None,
    can_reply: bool = True,
    channel: str = "Channel::Whatsapp",
) -> dict[str, Any]:
    """Build a ``message_created``/``message_updated`` webhook body as Chatwoot sends it.

    The shape follows chatwoot.md §3.5 (``Message#webhook_data`` plus ``event``) so the
    service's parser and gating logic are tested against the real quirks: string
    ``message_type``, ISO ``created_at``, ``conversation.id`` being the display id, a
    contact sender without ``type``, no ``attachments`` key when there are none, and a
    push-format copy of the message (integer type, Unix time) in ``conversation.messages``.

    ``status`` is the *conversation* status (``pending`` while the bot owns it).
    ``sender_type`` is ``None`` for a contact, ``"user"`` for a human agent or
    ``"agent_bot"`` for the bot's own messages. ``assignee`` is put into
    ``conversation.meta.assignee`` as given; its ``type`` decides ``assignee_type``.
    """
    if message_type not in MESSAGE_TYPE_INTS:
        raise ValueError(f"unknown message_type {message_type!r}")
    when = created_at if created_at is not None else datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    unix = int(when.timestamp())
    created_iso = iso_ms(when)

    # The conversation's contact: the sender of incoming messages, otherwise a stable id
    # derived from the conversation so repeated payloads for one conversation agree.
    if sender_type is None:
        contact_id, contact_name = sender_id, sender_name
    else:
        contact_id, contact_name = 100000 + conversation_id, _DEFAULT_CONTACT_NAME

    sender: dict[str, Any]
    push_sender: dict[str, Any]
    push_sender_type: str
    if sender_type is None:
        sender = _contact_webhook_data(sender_id, sender_name, account_id)
        push_sender = _contact_push_data(sender_id, sender_name)
        push_sender_type = "Contact"
    elif sender_type == "user":
        email = f"{sender_name.split()[0].lower()}@example.com" if sender_name else None
        sender = {"id": sender_id, "name": sender_name, "email": email, "type": "user"}
        push_sender = {
            "id": sender_id,
            "name": sender_name,
            "available_name": sender_name,
            "avatar_url": "",
            "type": "user",
            "availability_status": "online",
            "thumbnail": "",
        }
        push_sender_type = "User"
    elif sender_type == "agent_bot":
        sender = {"id": sender_id, "name": sender_name, "type": "agent_bot"}
        push_sender = {"id": sender_id, "name": sender_name, "avatar_url": "", "type": "agent_bot"}
        push_sender_type = "AgentBot"
    else:
        raise ValueError(f"unknown sender_type {sender_type!r}")

    atts: list[dict[str, Any]] | None = None
    if attachments is not None:
        atts = []
        for att in attachments:
            a = dict(att)
            if a.get("message_id") is None:
                a["message_id"] = message_id
            if a.get("account_id") is None:
                a["account_id"] = account_id
            atts.append(a)

    source_id: str | None = None
    if message_type == "incoming":
        digest = hashlib.sha256(f"{account_id}:{message_id}".encode()).digest()[:24]
        source_id = "wamid." + base64.b32encode(digest).decode().rstrip("=")

    push_message: dict[str, Any] = {
        "id": message_id,
        "content": content,
        "account_id": account_id,
        "inbox_id": inbox_id,
        "conversation_id": conversation_id,
        "message_type": MESSAGE_TYPE_INTS[message_type],
        "created_at": unix,
        "updated_at": created_iso,
        "private": private,
        "status": "sent",
        "source_id": source_id,
        "content_type": "text",
        "content_attributes": {},
        "sender_type": push_sender_type,
        "sender_id": sender_id,
        "external_source_ids": {},
        "additional_attributes": {},
        "processed_message_content": content,
        "sentiment": {},
        "sender": push_sender,
    }
    if atts:
        push_message["attachments"] = atts

    assignee_type: str | None = None
    if assignee is not None:
        assignee_type = {"user": "User", "agent_bot": "AgentBot"}.get(
            str(assignee.get("type")), "User"
        )

    account = {"id": account_id, "name": _ACCOUNT_NAME}
    phone_digits = _phone_for(contact_id).lstrip("+")
    incoming = message_type == "incoming"
    conversation: dict[str, Any] = {
        "id": conversation_id,
        "inbox_id": inbox_id,
        "channel": channel,
        "status": status,
        "can_reply": can_reply,
        "labels": [],
        "priority": None,
        "snoozed_until": None,
        "unread_count": 1 if incoming else 0,
        "first_reply_created_at": None if incoming else created_iso,
        "waiting_since": unix if incoming else 0,
        "agent_last_seen_at": 0,
        "contact_last_seen_at": 0,
        "last_activity_at": unix,
        "timestamp": unix,
        "created_at": unix,
        "updated_at": round(when.timestamp(), 6),
        "additional_attributes": {},
        "custom_attributes": {},
        "contact_inbox": {
            "id": 200000 + conversation_id,
            "contact_id": contact_id,
            "inbox_id": inbox_id,
            "source_id": phone_digits,
            "created_at": created_iso,
            "updated_at": created_iso,
            "hmac_verified": False,
            "pubsub_token": uuid.uuid5(uuid.NAMESPACE_URL, f"ci:{contact_id}").hex[:24],
        },
        "meta": {
            "sender": _contact_push_data(contact_id, contact_name),
            "assignee": dict(assignee) if assignee is not None else None,
            "assignee_type": assignee_type,
            "team": None,
            "hmac_verified": False,
        },
        "messages": [push_message],
        "account": account,
    }

    payload: dict[str, Any] = {
        "event": event,
        "id": message_id,
        "content": content,
        "content_type": "text",
        "content_attributes": {},
        "additional_attributes": {},
        "message_type": message_type,
        "private": private,
        "source_id": source_id,
        "created_at": created_iso,
        "sender": sender,
        "inbox": {"id": inbox_id, "name": _INBOX_NAME},
        "account": dict(account),
        "conversation": conversation,
    }
    if atts is not None:
        payload["attachments"] = atts
    return payload


def webhook_headers(
    raw_body: bytes, secret: str | None, *, timestamp: int | None = None
) -> dict[str, str]:
    """Headers Chatwoot sends with a webhook delivery (chatwoot.md §4).

    Always ``Content-Type``/``Accept``/``X-Chatwoot-Delivery``; when ``secret`` is set, also
    ``X-Chatwoot-Timestamp`` and ``X-Chatwoot-Signature: sha256=HMAC(secret, "ts.body")``,
    so tests can drive the service's signature verification with the real algorithm.
    """
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "X-Chatwoot-Delivery": str(uuid.uuid4()),
    }
    if secret:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        mac = hmac.new(secret.encode(), ts.encode() + b"." + raw_body, hashlib.sha256)
        headers["X-Chatwoot-Timestamp"] = ts
        headers["X-Chatwoot-Signature"] = "sha256=" + mac.hexdigest()
    return headers


# --------------------------------------------------------------------------------------------
# Shared server plumbing
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Chatwoot
# --------------------------------------------------------------------------------------------


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
    """Outcome of one echo webhook delivery; ``status`` is None when it raised."""

    at: float
    message_id: int
    status: int | None
    error: str | None = None


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

    async def _deliver_echo(self, url: str, payload: dict[str, Any]) -> None:
        """POST one webhook like ``Webhooks::Trigger``: 5 s timeout, no retry, errors logged."""
        raw = orjson.dumps(payload)
        at = time.time()
        try:
            if self._session is None:
                raise RuntimeError("stand-in stopped")
            async with self._session.post(
                url, data=raw, headers=webhook_headers(raw, self.echo_secret)
            ) as resp:
                await resp.read()
                self.echoes.append(Echo(at=at, message_id=payload["id"], status=resp.status))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Chatwoot logs and drops failed deliveries, never retries
            log.warning("echo webhook to %s failed: %r", url, exc)
            self.echoes.append(Echo(at=at, message_id=payload["id"], status=None, error=repr(exc)))


# --------------------------------------------------------------------------------------------
# Evolution API (the WhatsApp bridge of many self-hosted Chatwoot inboxes)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# OpenAI-compatible LLM
# --------------------------------------------------------------------------------------------


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


def _text_of(content: Any) -> str:
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
        tail.append(_text_of(msg.get("content")))
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
        prompt_tokens = sum(_count_tokens(_text_of(m.get("content"))) for m in call.messages)
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
