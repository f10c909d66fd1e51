"""Chatwoot: which webhook payloads the bot answers, and the REST client that posts replies.

Payload shapes follow Chatwoot's own code (`Message#webhook_data`; docs/chatwoot.md):
`message_type` is a string in webhooks, `conversation.id` is the display id that the REST paths
take, and the bot's own replies come back as `outgoing` message_created events, which must never
be answered.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import aiohttp
import orjson

from .attachments import Attachment, parse
from .config import Settings

MESSAGE_CREATED = "message_created"
# A reply longer than this is not something Chatwoot's error bodies ever need; keep logs small.
_ERROR_BODY_CHARS = 300
# A contact's name in the prompt; Chatwoot does not bound it, one buffered copy per message must be.
_NAME_CHARS = 100
# E.164 allows 15 digits; anything longer is not a phone number.
_PHONE_DIGITS = 15


class PayloadError(ValueError):
    """The body is JSON but not a usable Chatwoot payload; str() says which field is wrong."""


@dataclass(frozen=True)
class ChatMessage:
    """One Chatwoot message, reduced to what the buffer and the prompt need."""

    account_id: int
    conversation_id: int
    message_id: int
    text: str
    attachments: tuple[Attachment, ...] = ()
    role: str = "user"
    inbox_id: int | None = None
    sender_name: str = ""
    phone: str = ""  # the contact's number, digits only: WhatsApp presence goes to it (presence.py)
    # What the customer typed, when `text` also describes attachments (a contact card's name, a
    # file's name, an address): HANDOFF_KEYWORDS are looked for in this only.
    content: str | None = None

    @property
    def typed(self) -> str:
        return self.text if self.content is None else self.content

    @property
    def conv(self) -> str:
        """The conversation's identity in Redis: display ids are unique per account only."""
        return f"{self.account_id}:{self.conversation_id}"

    def to_json(self) -> bytes:
        entry: dict[str, Any] = {"id": self.message_id, "text": self.text}
        if self.attachments:
            entry["att"] = [a.to_dict() for a in self.attachments]
        if self.role != "user":
            entry["role"] = self.role
        else:
            # The job record's inbox and the prompt's contact name are read from the burst. The
            # history does without these four, and cuts them off by key (lib.lua for_history):
            # they stay after id, text and attachments.
            if self.inbox_id is not None:
                entry["inbox"] = self.inbox_id
            if self.sender_name:
                entry["name"] = self.sender_name[:_NAME_CHARS]
            if self.phone:
                entry["ph"] = self.phone
            if self.content is not None:
                entry["typed"] = self.content
        return orjson.dumps(entry)

    def to_entry(self) -> bytes:
        """The customer message in a compact buffer (lib.lua: buffer formats): [id, text, typed,
        t, attachments] with trailing empty ones cut (typed 0: as the text; t: set by append.lua
        for a message past the size cap). What the burst's messages share is in `burst_head`."""
        entry: list[Any] = [self.message_id, self.text, 0 if self.content is None else self.content, 0,
                            [a.to_dict() for a in self.attachments]]
        while len(entry) > 2 and not entry[-1] and entry[-1] != "":
            entry.pop()
        return orjson.dumps(entry)

    def to_history(self) -> bytes:
        """The message as a compact history entry (lib.lua for_history): "<id>:<text>", "a" in
        front for the assistant's; with attachments the json entry, which keeps them."""
        if self.attachments or self.role not in _HISTORY_MARKS:
            entry: dict[str, Any] = {"id": self.message_id, "text": self.text}
            if self.attachments:
                entry["att"] = [a.to_dict() for a in self.attachments]
            if self.role != "user":
                entry["role"] = self.role
            return orjson.dumps(entry)
        return f"{_HISTORY_MARKS[self.role]}{self.message_id}:{self.text}".encode()

    def burst_head(self) -> bytes:
        """The compact head after its first-message time: [inbox, name, phone] of this message,
        trailing empty ones cut, b"" for none (lib.lua: buffer formats)."""
        shared: list[Any] = [self.inbox_id or 0, self.sender_name[:_NAME_CHARS], self.phone]
        while shared and not shared[-1]:
            shared.pop()
        return orjson.dumps(shared) if shared else b""


def buffered(raw: Iterable[bytes | str]) -> tuple[int | None, list[dict[str, Any]]]:
    """A buffer's (or a claimed batch's) entries as message dicts in the json format's shape
    ({"id", "text", "att", "inbox", "name", "ph", "typed", "t"}, absent keys left out), in
    either format or both (lib.lua: buffer formats); with the first message ms that a compact
    head names (None without one)."""
    first: int | None = None
    shared: dict[str, Any] = {}
    out: list[dict[str, Any]] = []
    for one in raw:
        item = one.encode() if isinstance(one, str) else one
        if item[:1].isdigit():
            digits = len(item) - len(item.lstrip(b"0123456789"))
            first = int(item[:digits])
            values = orjson.loads(item[digits:]) if len(item) > digits else []
            shared = {k: v for k, v in zip(("inbox", "name", "ph"), values, strict=False) if v}
        elif item[:1] == b"[":
            fields = orjson.loads(item)
            entry: dict[str, Any] = {"id": fields[0], "text": fields[1]}
            if len(fields) > 4 and fields[4]:
                entry["att"] = fields[4]
            entry.update(shared)
            if len(fields) > 2 and isinstance(fields[2], str):
                entry["typed"] = fields[2]
            if len(fields) > 3 and fields[3]:
                entry["t"] = fields[3]
            out.append(entry)
        else:
            out.append(orjson.loads(item))
    return first, out


def from_history(raw: bytes | str) -> dict[str, Any]:
    """A history entry as {"id", "text", "att", "role"} (absent keys left out): json, or compact
    (ChatMessage.to_history)."""
    item = raw.encode() if isinstance(raw, str) else raw
    if item[:1] == b"{":
        entry: dict[str, Any] = orjson.loads(item)
        return entry
    role = next((r for r, mark in _HISTORY_MARKS.items() if mark and item.startswith(mark.encode())), "user")
    ident, _, text = item[len(_HISTORY_MARKS[role]):].partition(b":")
    return {"id": int(ident), "text": text.decode(), **({"role": role} if role != "user" else {})}


def typed_text(entry: dict[str, Any]) -> str:
    """What the customer typed in a stored message (ChatMessage.typed)."""
    return str(entry.get("typed", entry.get("text", "")))


@dataclass(frozen=True)
class Handoff:
    """Who handles a conversation, as one webhook shows it (see takeover_reason)."""

    account_id: int
    conversation_id: int
    reason: str  # why the bot must stay out; "" when the bot may answer
    version: float | None  # the conversation's `updated_at`: orders webhooks that overtake
    # Shown `pending`: the only snapshot that gives the bot back a conversation it handed over
    # (lib.lua take_charge).
    pending: bool = False

    @property
    def conv(self) -> str:
        return f"{self.account_id}:{self.conversation_id}"


@dataclass(frozen=True)
class Decision:
    """What to do with one webhook: buffer it, note it (history, who handles the conversation),
    or ignore it (with why)."""

    action: str  # "buffer" | "note" | "ignore"
    reason: str = ""
    message: ChatMessage | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    handoff: Handoff | None = None
    # Written by a person at Chatwoot (or the WhatsApp app), unless it is the echo of our own
    # reply: the store tells them apart, because a user access token makes ours look the same.
    from_agent: bool = False


# What marks a compact history entry's role (ChatMessage.to_history); the customer's is none.
_HISTORY_MARKS = {"user": "", "assistant": "a"}
# Chatwoot's ids are Postgres bigints; anything larger is not an id, only a bigger Redis key.
MAX_ID = 2**63 - 1
TRUNCATION_MARK = " [...message truncated]"
# A WhatsApp message carries one attachment (an album is one message per photo); the cap keeps a
# hostile list of thousands from being stored as thousands of names.
MAX_ATTACHMENTS = 10


def _is_id(value: object) -> TypeGuard[int]:
    # bool is an int subclass in Python; `true` is not an id.
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID


def _positive_int(value: Any, name: str) -> int:
    if not _is_id(value):
        raise PayloadError(f"{name} must be a positive integer")
    return value


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise PayloadError(f"{name} must be a string")
    return value


def truncate(text: str, max_chars: int) -> tuple[str, bool]:
    """Cap a message at max_chars, marked so that the LLM (and a reader) knows text is missing."""
    if len(text) <= max_chars:
        return text, False
    return text[: max_chars - len(TRUNCATION_MARK)] + TRUNCATION_MARK, True


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else type(value).__name__
    return "".join(ch for ch in text[:64] if ch.isprintable())


def message_text(content: Any, attachments: tuple[Attachment, ...]) -> str:
    """The message as text: each attachment described (e.g. "[image]", a location's address and
    coordinates), then the caption or body. The prompt shows images and voice notes in their
    place instead (media.py); history and operators read this."""
    parts = [a.describe() for a in attachments]
    if content:
        parts.append(content)
    return " ".join(parts)


# Events whose payload is the conversation (plus `changed_attributes`): who handles it.
CONVERSATION_EVENTS = frozenset({
    "conversation_created", "conversation_updated", "conversation_status_changed",
    "conversation_opened", "conversation_resolved",
})


def takeover_reason(conversation: dict[str, Any], settings: Settings) -> str:
    """Why the bot must not answer this conversation now ("" when it may): a human agent is
    assigned, a human moved it out of the bot's statuses, or WhatsApp's 24-hour window closed."""
    meta = conversation.get("meta")
    assignee = meta.get("assignee") if isinstance(meta, dict) else None
    if isinstance(assignee, dict) and assignee.get("type") == "user":
        return "human_assignee"
    status = conversation.get("status")
    if status not in settings.bot_conversation_statuses:
        return f"conversation_status:{_short(status)}"
    if conversation.get("can_reply") is False:
        return "reply_window_closed"
    return ""


def _phone(sender: Any, conversation: dict[str, Any]) -> str:
    """The contact's phone number in digits (E.164 without '+'), as Evolution API takes it:
    from the message's sender, else from the conversation's contact (`meta.sender`)."""
    meta = conversation.get("meta")
    for contact in (sender, meta.get("sender") if isinstance(meta, dict) else None):
        number = contact.get("phone_number") if isinstance(contact, dict) else None
        digits = "".join(ch for ch in number if ch.isdigit()) if isinstance(number, str) else ""
        if 6 <= len(digits) <= _PHONE_DIGITS:
            return digits
    return ""


def _version(conversation: dict[str, Any]) -> float | None:
    value = conversation.get("updated_at")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _conversation_event(payload: dict[str, Any], event: str, settings: Settings) -> Decision:
    """A conversation event is acknowledged whatever its shape; it only updates who handles
    the conversation when it names one."""
    ignored = Decision("ignore", f"event:{_short(event)}")
    nested = payload.get("conversation")
    conversation = nested if isinstance(nested, dict) else payload
    account = payload.get("account", conversation.get("account"))
    messages = conversation.get("messages")
    if isinstance(account, dict) and _is_id(account.get("id")):
        account_id = account["id"]
    elif isinstance(messages, list) and messages and isinstance(messages[0], dict) \
            and _is_id(messages[0].get("account_id")):
        account_id = messages[0]["account_id"]  # before Chatwoot 4.14.2 the payload had no account
    elif settings.chatwoot_account_id is not None:
        account_id = settings.chatwoot_account_id
    else:
        return ignored
    if not _is_id(conversation.get("id")) or not isinstance(conversation.get("status"), str):
        return ignored
    handoff = Handoff(account_id, conversation["id"], takeover_reason(conversation, settings),
                      _version(conversation), conversation["status"] == "pending")
    return Decision("note", ignored.reason, handoff=handoff)


def classify(payload: dict[str, Any], settings: Settings, default_event: str | None = None) -> Decision:
    """Decide what a webhook payload means for the bot.

    Raises PayloadError only for a message_created payload whose fields we rely on have the
    wrong type; every other event is acknowledged and ignored, because Chatwoot sends many
    kinds (status changes, typing, contacts) to the same URL. Conversation events and the
    conversation inside every message still tell who handles the conversation (Handoff).
    """
    event = payload.get("event", default_event)
    if event is None:
        return Decision("ignore", "no_event")
    if isinstance(event, str) and event in CONVERSATION_EVENTS:
        return _conversation_event(payload, event, settings)
    if event != MESSAGE_CREATED:
        return Decision("ignore", f"event:{_short(event)}")

    message_id = _positive_int(payload.get("id"), "id")
    conversation = payload.get("conversation")
    if not isinstance(conversation, dict):
        raise PayloadError("conversation must be an object")
    conversation_id = _positive_int(conversation.get("id"), "conversation.id")

    account = payload.get("account")
    if account is None:
        if settings.chatwoot_account_id is None:
            return Decision("ignore", "no_account")
        account_id = settings.chatwoot_account_id
    elif isinstance(account, dict):
        account_id = _positive_int(account.get("id"), "account.id")
    else:
        raise PayloadError("account must be an object")

    content = payload.get("content")
    if content is not None and not isinstance(content, str):
        raise PayloadError("content must be a string or null")
    raw_attachments = payload.get("attachments", [])
    if not isinstance(raw_attachments, list):
        raise PayloadError("attachments must be an array")
    attachments = parse(raw_attachments, MAX_ATTACHMENTS)
    private = payload.get("private", False)
    if not isinstance(private, bool):
        raise PayloadError("private must be a boolean")
    _optional_str(conversation.get("status"), "conversation.status")
    inbox = payload.get("inbox")
    inbox_id = conversation.get("inbox_id")
    if isinstance(inbox, dict) and _is_id(inbox.get("id")):
        inbox_id = inbox["id"]
    inbox_id = inbox_id if _is_id(inbox_id) else None
    sender = payload.get("sender")
    sender_name = sender.get("name") if isinstance(sender, dict) else None
    text, truncated = truncate(message_text(content, attachments), settings.max_message_chars)
    extra = {"truncated": True} if truncated else {}

    handoff = Handoff(account_id, conversation_id, takeover_reason(conversation, settings),
                      _version(conversation), conversation.get("status") == "pending")

    message_type = _optional_str(payload.get("message_type"), "message_type")
    if message_type == "outgoing" and not private and text:
        # The bot's own replies and human agents' answers: context for later prompts.
        note = ChatMessage(account_id, conversation_id, message_id, text, attachments,
                           role="assistant", inbox_id=inbox_id)
        attributes = payload.get("content_attributes")
        # A null sender with `external_echo`: sent from the WhatsApp Business app, by a person.
        from_agent = (sender.get("type") == "user" if isinstance(sender, dict)
                      else isinstance(attributes, dict) and attributes.get("external_echo") is True)
        return Decision("note", "outgoing", note, extra, handoff, from_agent)
    if message_type != "incoming":
        return Decision("ignore", f"message_type:{_short(message_type)}")
    if private:
        return Decision("ignore", "private_note")
    if handoff.reason:
        # Acknowledged, never answered: kept as context, and the conversation is marked as not
        # the bot's so that a burst already waiting is dropped too.
        context = ChatMessage(account_id, conversation_id, message_id, text, attachments,
                              inbox_id=inbox_id) if text else None
        return Decision("note", handoff.reason, context, extra, handoff)
    if not text:
        return Decision("ignore", "empty_message")
    return Decision(
        "buffer",
        message=ChatMessage(
            account_id, conversation_id, message_id, text, attachments,
            inbox_id=inbox_id,
            sender_name=sender_name if isinstance(sender_name, str) else "",
            phone=_phone(sender, conversation),
            content=truncate(content or "", settings.max_message_chars)[0] if attachments else None,
        ),
        extra=extra,
        handoff=handoff,  # the bot is in charge, as of this snapshot (store.append weighs it)
    )


class ChatwootError(Exception):
    """A call to Chatwoot failed. `retryable` says whether trying again can help; `unsure`, for
    a reply's post, that Chatwoot may have created the message all the same (a timeout, a
    connection lost after the request was sent, a 5xx), so it must not simply be posted again."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = True,
                 retry_after_s: float | None = None, unsure: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.unsure = unsure


# Chatwoot's message_type enum in REST answers (webhooks carry the name).
_OUTGOING = 1
# `GET …/messages?after=<id>` answers at most this many messages, oldest first.
_PAGE = 100
_MAX_PAGES = 5


def same_reply(a: str, b: str) -> bool:
    """Whether a message's text is our reply: the comparison lua/lib.lua's fingerprint makes of
    webhook echoes (whitespace and backslashes dropped, the first 64 characters), because
    Chatwoot normalises line breaks and may shorten a long text."""
    return _bare(a) == _bare(b)


def _bare(text: str) -> str:
    return re.sub(r"[ \t\n\r\f\v\\]", "", text)[:64]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class ChatwootClient:
    """Posts replies through Chatwoot's REST API with the `api_access_token` header."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._base = settings.chatwoot_base_url
        self._headers = {"api_access_token": settings.chatwoot_api_token}
        self._timeout = aiohttp.ClientTimeout(total=settings.chatwoot_timeout_s)
        # A post whose outcome is unknown may still be under way inside Chatwoot (behind a
        # proxy that gave up on it, or one we stopped waiting for). Its retry waits until two
        # timeouts after it was sent, so that such a request has ended, and its webhook echo may
        # have come, before Chatwoot is asked whether the message exists
        # (docs/delivery-guarantees.md).
        self._settle_s = settings.chatwoot_timeout_s
        self._session = session

    async def post_reply(self, account_id: int, conversation_id: int, content: str) -> int:
        """Create an outgoing message; returns Chatwoot's id of the new message."""
        url = f"{self._base}/api/v1/accounts/{account_id}/conversations/{conversation_id}/messages"
        body = {"content": content, "message_type": "outgoing", "private": False}
        sent = time.monotonic()

        def settled(retry_after: float | None = None) -> float:
            # When the retry may ask about this post: two timeouts after it was sent.
            return max(retry_after or 0.0, 2 * self._settle_s - (time.monotonic() - sent))

        try:
            async with self._session.post(url, json=body, headers=self._headers,
                                          timeout=self._timeout) as resp:
                raw = await resp.content.read(1_000_000)
                if resp.status >= 300:
                    detail = raw[:_ERROR_BODY_CHARS].decode("utf-8", "replace")
                    unsure = resp.status >= 500
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
                    raise ChatwootError(
                        f"Chatwoot answered HTTP {resp.status} to the reply: {detail}",
                        status=resp.status, retryable=resp.status == 429 or unsure,
                        retry_after_s=settled(retry_after) if unsure else retry_after, unsure=unsure,
                    )
        except aiohttp.ClientConnectorError as exc:  # no connection: nothing was sent
            raise ChatwootError(f"Chatwoot unreachable: {type(exc).__name__}: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Sent, or partly: Chatwoot may be creating the message while we give up.
            raise ChatwootError(f"Chatwoot did not answer the reply: {type(exc).__name__}: {exc}",
                                unsure=True, retry_after_s=settled()) from exc
        try:
            created = orjson.loads(raw)
            return int(created["id"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            # The message was created (2xx); only its id is unknown. Posting again would duplicate.
            return 0

    async def toggle_typing(self, account_id: int, conversation_id: int, on: bool, *,
                            timeout_s: float) -> None:
        """Show or hide the bot's typing indicator (`ConversationsController#toggle_typing_status`);
        raises ChatwootError when Chatwoot does not take it."""
        await self._post(f"{self._base}/api/v1/accounts/{account_id}/conversations/"
                         f"{conversation_id}/toggle_typing_status",
                         {"typing_status": "on" if on else "off", "is_private": False},
                         aiohttp.ClientTimeout(total=timeout_s))

    async def post_note(self, account_id: int, conversation_id: int, content: str) -> None:
        """A private note: seen by the agents only, never sent to the customer."""
        await self._post(f"{self._conversation(account_id, conversation_id)}/messages",
                         {"content": content, "message_type": "outgoing", "private": True},
                         self._timeout)

    async def set_status(self, account_id: int, conversation_id: int, status: str) -> None:
        """`ConversationsController#toggle_status`; `open` is an agent bot's handoff."""
        await self._post(f"{self._conversation(account_id, conversation_id)}/toggle_status",
                         {"status": status}, self._timeout)

    async def conversation_version(self, account_id: int, conversation_id: int) -> float | None:
        """The conversation's `updated_at` (what versions webhook snapshots), or None when
        Chatwoot does not tell it."""
        status, body = await self._get(self._conversation(account_id, conversation_id), None)
        value = body.get("updated_at") if status == 200 and isinstance(body, dict) else None
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    def _conversation(self, account_id: int, conversation_id: int) -> str:
        return f"{self._base}/api/v1/accounts/{account_id}/conversations/{conversation_id}"

    async def _post(self, url: str, body: dict[str, Any], timeout: aiohttp.ClientTimeout) -> Any:
        """A POST whose effect is not a reply (no unsure outcome to settle): its JSON answer, or
        None when it has none; ChatwootError for anything but 2xx."""
        try:
            async with self._session.post(url, json=body, headers=self._headers,
                                          timeout=timeout) as resp:
                raw = await resp.content.read(1_000_000)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ChatwootError(f"Chatwoot did not answer: {type(exc).__name__}: {exc}") from exc
        if resp.status >= 300:
            raise ChatwootError(f"Chatwoot answered HTTP {resp.status}: "
                                f"{raw[:_ERROR_BODY_CHARS].decode('utf-8', 'replace')}",
                                status=resp.status,
                                retryable=resp.status == 429 or resp.status >= 500,
                                retry_after_s=_retry_after(resp.headers.get("Retry-After")))
        try:
            return orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return None

    async def messages_after(self, account_id: int, conversation_id: int,
                             after_id: int) -> tuple[list[dict[str, Any]], bool]:
        """The conversation's messages newer than `after_id`, oldest first, and whether that is
        all of them. Raises ChatwootError when Chatwoot does not answer usably.

        A user token lists them (`GET …/messages?after=`, up to 5 pages of 100). An agent bot's
        token may not (401): then only the conversation's newest message is known
        (`last_non_activity_message` of `GET …/conversations/{id}`, readable by bots since
        Chatwoot 4.14.2), and it is all of them only when nothing came after `after_id`.
        """
        url = f"{self._base}/api/v1/accounts/{account_id}/conversations/{conversation_id}"
        found: list[dict[str, Any]] = []
        after = after_id
        for _ in range(_MAX_PAGES):
            status, body = await self._get(f"{url}/messages", {"after": str(after)})
            if status == 401 and after == after_id:
                return await self._newest_after(url, after_id)
            payload = body.get("payload") if isinstance(body, dict) else None
            if status != 200 or not isinstance(payload, list):
                raise ChatwootError(f"cannot list the conversation's messages: HTTP {status}",
                                    status=status, unsure=True)
            page = [m for m in payload if isinstance(m, dict) and _is_id(m.get("id")) and m["id"] > after]
            found += page
            if len(payload) < _PAGE:
                return found, True
            after = max(m["id"] for m in page) if page else after
        return found, False

    async def _newest_after(self, url: str, after_id: int) -> tuple[list[dict[str, Any]], bool]:
        status, body = await self._get(url, None)
        last = body.get("last_non_activity_message") if isinstance(body, dict) else None
        if status != 200 or not (last is None or (isinstance(last, dict) and _is_id(last.get("id")))):
            raise ChatwootError(f"cannot read the conversation: HTTP {status}", status=status,
                                unsure=True)
        if last is None or last["id"] <= after_id:
            return [], True
        return [last], False

    async def _get(self, url: str, params: dict[str, str] | None) -> tuple[int, Any]:
        try:
            async with self._session.get(url, params=params, headers=self._headers,
                                         timeout=self._timeout) as resp:
                raw = await resp.content.read(4_000_000)
                if resp.status != 200:
                    return resp.status, None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ChatwootError(f"Chatwoot unreachable: {type(exc).__name__}: {exc}",
                                unsure=True) from exc
        try:
            return 200, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return 200, None


def earlier_post(messages: list[dict[str, Any]], complete: bool, reply: str,
                 known: set[int]) -> tuple[str, int]:
    """What Chatwoot's messages after a burst say about an earlier post of `reply` whose outcome
    is unknown: ('posted', its id), ('human', the id of a person's answer: the bot must not
    post over it), or ('absent', 0). `known`: ids the service has already seen (its finished
    replies, messages its webhooks noted), which are not this post: an earlier reply may have
    the same text. Raises ChatwootError when the messages cannot tell."""
    fresh = [m for m in messages if m["id"] not in known]
    mine = next((m["id"] for m in fresh if _outgoing(m) and isinstance(m.get("content"), str)
                 and same_reply(m["content"], reply)), None)
    if mine is not None:
        return "posted", int(mine)
    person = next((m["id"] for m in fresh if _outgoing(m) and _by_person(m)), None)
    if person is not None:
        return "human", int(person)
    # Only the newest message is known: an outgoing one the service saw was posted before this
    # batch began (an earlier reply, a person's answer), so a post of this batch would be newer.
    if complete or (len(messages) == 1 and not fresh and _outgoing(messages[0])):
        return "absent", 0
    raise ChatwootError("cannot tell whether the reply was posted: the token may not list "
                        "messages and the conversation has newer ones", unsure=True)


def _outgoing(message: dict[str, Any]) -> bool:
    return message.get("message_type") in (_OUTGOING, "outgoing") and not message.get("private")


def _by_person(message: dict[str, Any]) -> bool:
    sender = message.get("sender")
    if isinstance(sender, dict):
        return sender.get("type") == "user"
    attributes = message.get("content_attributes")
    return isinstance(attributes, dict) and attributes.get("external_echo") is True
