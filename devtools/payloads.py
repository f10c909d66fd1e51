"""Chatwoot webhook bodies and headers as Chatwoot sends them, for the tests, the benchmarks,
the demo and the Chatwoot stand-in's echoes.

The shapes follow docs/chatwoot.md (the ``message_created`` payload, its attachments, the
delivery headers and signature), so the service's parser and gating logic meet the real
quirks, not a simplified copy of them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import time
import uuid
from datetime import UTC, datetime
from typing import Any

#: Chatwoot's ``Message.message_type`` enum. Webhooks carry the name, the REST API and the
#: push-format message inside ``conversation.messages`` carry the integer.
MESSAGE_TYPE_INTS: dict[str, int] = {"incoming": 0, "outgoing": 1, "activity": 2, "template": 3}

_ACCOUNT_NAME = "Loja Acme"
_INBOX_NAME = "WhatsApp Vendas"
_DEFAULT_CONTACT_NAME = "Maria Souza"

# Attachment ids only need to be unique within a test run; a process-wide counter does that.
_attachment_ids = itertools.count(7000)


def iso_ms(dt: datetime) -> str:
    """Render ``dt`` the way ActiveSupport serialises a ``TimeWithZone`` in webhooks.

    Chatwoot's message ``created_at`` is ISO-8601 in UTC with exactly three fractional
    digits and a ``Z`` suffix (docs/chatwoot.md, ``message_created`` payload); parsers in the
    service must cope with precisely this form, so the stand-in must produce precisely this
    form. Naive datetimes are taken to be UTC.
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

    The field set depends on ``file_type`` (docs/chatwoot.md, ``attachments[]``) and the
    service's media handling branches on exactly those fields, so tests get realistic defaults
    for each type. ``message_id`` and ``account_id`` are left ``None`` for :func:`message_payload`
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


def _contact_webhook_data(contact_id: int, name: str, account_id: int) -> dict[str, Any]:
    """``Contact#webhook_data``: the incoming-message sender, the push fields but no ``type``
    key, plus the account, ``avatar`` and ``blocked``."""
    data = _contact_push_data(contact_id, name)
    del data["type"]
    return {"account": {"id": account_id, "name": _ACCOUNT_NAME}, **data, "avatar": "", "blocked": False}


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

    The shape follows docs/chatwoot.md (``Message#webhook_data`` plus ``event``) so the
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
    """Headers Chatwoot sends with a webhook delivery (docs/chatwoot.md, Webhooks).

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
