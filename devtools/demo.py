"""`make demo`: the whole service end to end on this machine, with a printed timeline.

Starts a real redis-server with the repo's redis.conf on a free port, local stand-ins for
Chatwoot, an OpenAI-compatible LLM and Evolution API (the WhatsApp bridge), and `buffer-service
serve` as a real process configured by environment variables, exactly as an operator would.
Then four customers write on WhatsApp:

- Maria writes a burst, among it a voice note and a photo (served by "Chatwoot" behind its
  storage redirect): the voice note is transcribed while the window runs, and one LLM call gets
  the transcript and the photo in place;
- João asks two questions and the model answers in three paragraphs, posted as REPLY_SPLIT has
  it (by default one message per paragraph, with a pause before each further one);
- Ana asks for a person (HANDOFF_KEYWORDS): handed to a human at once, without the LLM;
- Pedro wants a refund and the model hands him over with its handoff_to_human tool.

The timeline is what the stand-ins recorded and what the service logged: messages in, typing on
(Chatwoot's indicator and WhatsApp's "composing") from before the LLM call until after the last
message, the LLM calls, every message posted with the time since the one before, the handoffs'
private notes and status changes, and the bot's own messages echoed back by "Chatwoot" and ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .chatwoot_standin import ChatwootStandIn
from .evolution_standin import EvolutionStandIn
from .llm_standin import LLMCall, LLMStandIn, default_reply, text_of
from .net import free_port, wait_http
from .payloads import attachment, message_payload
from .processes import operator_env, spawn_service, stop
from .redis_server import RedisServer


@dataclass(frozen=True)
class Customer:
    conversation: int
    contact: int  # Chatwoot's contact id: its phone number is where WhatsApp's presence goes
    name: str
    story: str
    handed_over: str = ""  # how the conversation goes to a human: "keyword", "model" or not


MARIA = Customer(245, 1, "Maria", "writes a burst with a voice note and a photo")
JOAO = Customer(312, 2, "João", "asks two questions; the model answers in three paragraphs")
ANA = Customer(401, 3, "Ana", "asks for a person (a handoff keyword)", handed_over="keyword")
PEDRO = Customer(518, 4, "Pedro", "wants a refund; the model hands him over", handed_over="model")
CUSTOMERS = (MARIA, JOAO, ANA, PEDRO)

HANDOFF_KEYWORDS = "atendente,humano,human"
HANDOFF_MESSAGE = "Um momento, vou chamar uma pessoa da equipe."

# A few bytes that say what the stand-in's "transcription" of them returns.
_VOICE_NOTE = "the box arrived broken, the lid is completely crushed"
_PHOTO = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64
_HOURS = ("Hi João! Yes, we are open on Sundays.\n\n"
          "On Sundays from 10:00 to 16:00, Monday to Saturday from 9:00 to 20:00.\n\n"
          "Anything else I can help with?")
_SORRY = "I'm sorry, Pedro. A colleague will take over and sort out your refund."


def _customer_said(messages: list[dict[str, Any]]) -> str:
    return " ".join(text_of(m.get("content")) for m in messages if m.get("role") == "user")


def _model_reply(messages: list[dict[str, Any]]) -> str:
    """The stand-in model: opening hours in three paragraphs, an apology for a refund, otherwise
    the stand-in's "Reply to: ..." that shows which messages the call combined."""
    said = _customer_said(messages)
    if "Sunday" in said:
        return _HOURS
    if "refund" in said:
        return _SORRY
    return default_reply(messages)


def _model_tools(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if "refund" not in _customer_said(messages):
        return []
    return [{"name": "handoff_to_human", "arguments": {
        "reason": "the customer wants a refund", "summary": "Third broken box; wants his money back."}}]


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.time()
        self.events: list[tuple[float, str, str]] = []

    def add(self, at: float, who: str, what: str) -> None:
        self.events.append((at, who, what))

    def lines(self) -> list[str]:
        """One line per event in time order; an event of several lines is indented under it."""
        return [f"{at - self.t0:8.3f}s  {who:<10} " + what.replace("\n", "\n" + " " * 22)
                for at, who, what in sorted(self.events)]

    def print(self) -> None:
        print("\nTimeline (seconds since the first message)")
        print("-" * 78)
        print("\n".join(self.lines()))
        print("-" * 78)


@dataclass
class Demo:
    """One run: what the customers sent, what the stand-ins recorded, the service's log."""

    sent: list[tuple[Customer, str]]
    llm: LLMStandIn
    chatwoot: ChatwootStandIn
    evolution: EvolutionStandIn
    log_path: Path
    timeline: Timeline = field(default_factory=Timeline)
    #: The customers' phone numbers (digits, as Evolution gets them) and their conversations.
    numbers: dict[str, int] = field(default_factory=dict)

    def conversation_of(self, call: LLMCall) -> int | None:
        """The conversation whose messages an LLM call was asked about."""
        said = _customer_said(call.messages)
        return next((c.conversation for c, text in self.sent if text and text in said), None)


def _shown(content: object) -> str:
    """A prompt message for the timeline: image parts as their size, not their bytes."""
    if not isinstance(content, list):
        return repr(content)
    return "[" + ", ".join(
        repr(p.get("text")) if p.get("type") == "text"
        else f"<image, {len(p['image_url']['url']) * 3 // 4 // 1024} KB inline>" for p in content) + "]"


def _log(path: Path) -> Iterator[tuple[float, dict[str, Any]]]:
    """The service's JSON log entries with their times."""
    for line in path.read_bytes().splitlines():
        try:
            entry = orjson.loads(line)
            yield datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp(), entry
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
            continue  # the few lines that are not the service's JSON log


def _settled(demo: Demo) -> bool:
    """Every conversation's burst finished, and every typing indicator that went on went off."""
    finished = {entry.get("conversation") for _, entry in _log(demo.log_path)
                if entry.get("event") in ("reply_posted", "batch_skipped")}
    asked = {demo.conversation_of(call) for call in demo.llm.calls}
    numbers = {p.number for p in demo.evolution.presence}
    return (all(f"1:{c.conversation}" in finished for c in CUSTOMERS)
            and all(demo.chatwoot.typing_for(conv)[-1:] == ["off"] for conv in asked)
            and all(demo.evolution.presence_for(n)[-1:] == ["paused"] for n in numbers))


async def run(window_ms: int, gap_s: float = 0.5, workdir: Path | None = None) -> Demo:
    """Start everything, let the customers write `gap_s` apart, wait until every conversation is
    answered or handed over, stop everything; returns the run with its timeline. Redis' data and
    the service's log stay in `workdir` (a new temporary directory by default)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="buffer-demo-"))
    redis = RedisServer(workdir).start()
    llm, chatwoot = LLMStandIn(api_key="demo-llm-key"), ChatwootStandIn(token="demo-chatwoot-token")
    evolution = EvolutionStandIn(api_key="demo-evolution-key", instance="shop")
    demo = Demo([], llm, chatwoot, evolution, workdir / "service.log")
    for server in (llm, chatwoot, evolution):
        await server.start()
    llm.transcription_delay = window_ms / 2000  # a transcription that takes half the window
    llm.reply_fn, llm.tool_calls_fn = _model_reply, _model_tools
    port = free_port()
    service_url = f"http://127.0.0.1:{port}"
    chatwoot.echo_webhook_url = f"{service_url}/webhooks/chatwoot"
    env = operator_env(
        REDIS_URL=redis.url,
        HOST="127.0.0.1",
        PORT=port,
        OPENAI_API_KEY="demo-llm-key",
        OPENAI_BASE_URL=f"{llm.base_url}/v1",
        CHATWOOT_BASE_URL=chatwoot.base_url,
        CHATWOOT_API_TOKEN="demo-chatwoot-token",
        EVOLUTION_API_URL=evolution.base_url,
        EVOLUTION_API_KEY=evolution.api_key,
        EVOLUTION_INSTANCE=evolution.instance,
        HANDOFF_KEYWORDS=HANDOFF_KEYWORDS,
        HANDOFF_MESSAGE=HANDOFF_MESSAGE,
        MESSAGE_BUFFER_DURATION_MS=window_ms,
        BUFFER_PROCESSING_INTERVAL_MS=10000,
        LOG_FORMAT="json",
    )
    print(f"redis-server on 127.0.0.1:{redis.port} (repo redis.conf, data in {workdir})")
    print(f"LLM stand-in at {llm.base_url}/v1, Chatwoot stand-in at {chatwoot.base_url}, "
          f"Evolution API stand-in at {evolution.base_url}")
    print(f"buffer-service serve on {service_url}, MESSAGE_BUFFER_DURATION_MS={window_ms}, "
          f"HANDOFF_KEYWORDS={HANDOFF_KEYWORDS}")
    for c in CUSTOMERS:
        print(f"  conv {c.conversation}: {c.name} {c.story}")
    service = spawn_service(["serve"], env, demo.log_path)
    try:
        async def service_alive() -> None:
            if service.poll() is not None:
                raise RuntimeError(f"buffer-service exited during start-up; see {demo.log_path}")

        await wait_http(f"{service_url}/readyz", timeout=20, interval=0.1, alive=service_alive)
        demo.timeline.t0 = time.time()
        await _write(demo, service_url, gap_s)
        deadline = time.monotonic() + window_ms / 1000 + 15
        while not _settled(demo) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # let the echoes of the last messages arrive
        await chatwoot.wait_echoes()
    finally:
        stop(service, 15)
        for server in (llm, chatwoot, evolution):
            await server.stop()
        redis.stop()
    _record(demo)
    return demo


async def _write(demo: Demo, service_url: str, gap_s: float) -> None:
    """The customers' messages as Chatwoot's webhooks, `gap_s` apart."""
    chatwoot = demo.chatwoot
    voice = attachment("audio", data_url=chatwoot.add_file(_VOICE_NOTE.encode(), "voice.ogg",
                                                           "audio/ogg"))
    photo = attachment("image", data_url=chatwoot.add_file(_PHOTO, "photo.png", "image/png"))
    # Each customer's messages at most 2 x gap_s apart: one burst each in a window of 2 s.
    messages = [(MARIA, "Oi! I ordered last week", None), (MARIA, None, voice),
                (JOAO, "hello, do you open on Sunday?", None), (MARIA, "order #5521, look:", photo),
                (JOAO, "and until what time?", None), (MARIA, "what now?", None),
                (ANA, "meu pedido ainda não chegou", None), (ANA, "quero falar com um atendente", None),
                (PEDRO, "boa tarde", None), (PEDRO, "I want a refund, this is the third broken box!", None)]
    async with aiohttp.ClientSession() as session:
        for i, (customer, text, media) in enumerate(messages):
            payload = message_payload(message_id=90_000 + i, conversation_id=customer.conversation,
                                      content=text, sender_id=customer.contact,
                                      sender_name=customer.name,
                                      attachments=[media] if media else None)
            demo.sent.append((customer, text or ""))
            demo.numbers[payload["sender"]["phone_number"].lstrip("+")] = customer.conversation
            if media:
                kind = {"audio": "voice note", "image": "photo"}[media["file_type"]]
                text = f"{text or ''} [{kind}]".strip()
            sent = time.time()
            async with session.post(f"{service_url}/webhooks/chatwoot", json=payload) as resp:
                body = await resp.json()
            demo.timeline.add(sent, "webhook", f"conv {customer.conversation} <- {customer.name}: "
                              f"{text!r}: HTTP {resp.status} {body['status']} "
                              f"({body.get('buffered_messages')} in buffer, flush in "
                              f"{body.get('flush_in_ms')} ms), answered in "
                              f"{(time.time() - sent) * 1000:.1f} ms")
            await asyncio.sleep(gap_s)


def _record(demo: Demo) -> None:
    """What the stand-ins recorded and the service logged, into the timeline."""
    add, chatwoot = demo.timeline.add, demo.chatwoot
    for call in demo.llm.calls:
        users = [_shown(m["content"]) for m in call.messages if m["role"] == "user"]
        paragraphs = len([p for p in (call.reply or "").split("\n\n") if p.strip()])
        tools = "".join(f" and a {c['name']} call" for c in call.tool_calls)
        add(call.at, "llm", f"conv {demo.conversation_of(call)}: 1 call with {len(users)} user "
            f"messages: {', '.join(users)} -> a reply of {paragraphs} paragraph(s){tools}")
    for tx in demo.llm.transcriptions:
        add(tx.at, "llm", f"transcription of {tx.filename} ({tx.size} bytes) started")
        add(tx.done_at, "llm", f"transcription of {tx.filename} done (HTTP {tx.status})")
    for typing in chatwoot.typing:
        add(typing.at, "chatwoot", f"conv {typing.conversation_id}: typing {typing.status}")
    for presence in demo.evolution.presence:
        shown = f" ('typing...' for up to {presence.delay / 1000:.0f} s)" \
            if presence.presence == "composing" else ""
        add(presence.at, "whatsapp", f"conv {demo.numbers.get(presence.number)}: presence "
            f"{presence.presence}{shown} to +{presence.number} (Evolution sendPresence)")
    previous: dict[int, float] = {}
    for post in chatwoot.posts:
        conv, content = post.conversation_id, post.body["content"]
        if post.body.get("private"):
            add(post.at, "chatwoot", f"conv {conv}: private note for the agents (message id "
                f"{post.message_id}):\n{content}")
            continue
        after = "" if conv not in previous else (
            f" after a pause of {post.at - previous[conv]:.2f} s since the previous one"
            + (", typing on meanwhile" if _typing_throughout(chatwoot, conv, previous[conv], post.at)
               else ""))
        previous[conv] = post.at
        add(post.at, "chatwoot", f"conv {conv}: message posted{after}: {content!r} (message id "
            f"{post.message_id})")
    for change in chatwoot.status_changes:
        add(change.at, "chatwoot", f"conv {change.conversation_id}: status set to {change.status}"
            + (": the agents' now, the bot stays out" if change.status == "open" else ""))
    for at, entry in _log(demo.log_path):
        event = entry.get("event")
        if event == "reply_posted":
            add(at, "worker", f"batch {entry['batch']} of conv {entry['conversation']} flushed by "
                f"{entry['trigger']} ({entry['messages']} messages, {entry['lateness_ms']} ms after "
                "its deadline), done")
        elif event == "reply_superseded":
            add(at, "worker", f"batch {entry['batch']} of conv {entry['conversation']}: reply dropped, "
                f"{entry['waiting_messages']} newer messages came meanwhile (answered together next)")
        elif event == "batch_skipped":
            add(at, "worker", f"batch {entry['batch']} of conv {entry['conversation']} skipped "
                f"({entry['reason']})")
        elif event == "handed_over":
            add(at, "worker", f"conv {entry['conversation']} handed to a human ({entry['reason']})")
        elif event == "webhook" and entry.get("reason") == "outgoing":
            add(at, "webhook", f"conv {entry['conversation']} <- the bot's own message echoed by "
                "Chatwoot: ignored (kept as history)")


def _typing_throughout(chatwoot: ChatwootStandIn, conv: int, start: float, end: float) -> bool:
    """Chatwoot showed the bot typing in `conv` from `start` to `end`."""
    states = [t for t in chatwoot.typing if t.conversation_id == conv and t.at < end]
    return [t.status for t in states if t.at <= start][-1:] == ["on"] \
        and all(t.status == "on" for t in states if t.at > start)


def _problems(demo: Demo) -> list[str]:
    """What the run should have shown and did not."""
    chatwoot, problems = demo.chatwoot, []
    calls = Counter(demo.conversation_of(call) for call in demo.llm.calls)
    for c in CUSTOMERS:
        conv = c.conversation
        if not [p for p in chatwoot.posts_for(conv) if not p.body.get("private")]:
            problems.append(f"conv {conv}: no message to the customer")
        number = next((n for n, n_conv in demo.numbers.items() if n_conv == conv), "")
        for where, states, on, off in (("typing", chatwoot.typing_for(conv), "on", "off"),
                                       ("WhatsApp presence", demo.evolution.presence_for(number),
                                        "composing", "paused")):
            if calls[conv] and states[:1] + states[-1:] != [on, off]:
                problems.append(f"conv {conv}: {where} {states}, not {on} first and {off} last")
        if c.handed_over and (chatwoot.statuses.get(conv) != "open" or not chatwoot.notes_for(conv)):
            problems.append(f"conv {conv}: not handed over (no private note or status open)")
        if c.handed_over == "keyword" and calls[conv]:
            problems.append(f"conv {conv}: the LLM was called despite the handoff keyword")
    return problems


def report(demo: Demo) -> int:
    """Print the timeline and a summary counted from the records; 1 when something is missing."""
    demo.timeline.print()
    chatwoot = demo.chatwoot
    calls = Counter(demo.conversation_of(call) for call in demo.llm.calls)
    typing = Counter(t.status for t in chatwoot.typing)
    presence = Counter(p.presence for p in demo.evolution.presence)
    notes = [p for p in chatwoot.posts if p.body.get("private")]
    print(f"\n{len(demo.sent)} messages in {len(CUSTOMERS)} conversations -> {len(demo.llm.calls)} "
          "LLM calls (" + ", ".join(f"conv {c.conversation}: {calls[c.conversation]}" for c in CUSTOMERS)
          + f"), {len(chatwoot.posts) - len(notes)} messages to the customers, {len(notes)} private "
          f"notes, {sum(s.status == 'open' for s in chatwoot.status_changes)} conversations set open; "
          f"typing on/off {typing['on']}/{typing['off']}, WhatsApp composing/paused "
          f"{presence['composing']}/{presence['paused']}. Service log: {demo.log_path}")
    problems = _problems(demo)
    for problem in problems:
        print(f"UNEXPECTED: {problem}", file=sys.stderr)
    return 1 if problems else 0


async def run_demo(window_ms: int) -> int:
    return report(await run(window_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window-ms", type=int, default=2000,
                        help="MESSAGE_BUFFER_DURATION_MS for the demo (production default 30000)")
    args = parser.parse_args()
    sys.exit(asyncio.run(run_demo(args.window_ms)))


if __name__ == "__main__":
    main()
