"""`make demo`: the whole service end to end on this machine, with a printed timeline.

Starts a real redis-server with the repo's redis.conf on a free port, local stand-ins for
Chatwoot and an OpenAI-compatible LLM, and `buffer-service serve` as a real process configured
by environment variables, exactly as an operator would. Then a customer writes a burst of
WhatsApp messages (among them a voice note and a photo, served by "Chatwoot" behind its storage
redirect), a second customer writes two, and the timeline shows what happened: messages in, the
voice note transcribed while the window runs, buffers flushed, one LLM call per burst with the
transcript and the photo in place, one reply each, the bot's own reply echoed back by
"Chatwoot" and ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import orjson

from .chatwoot_standin import ChatwootStandIn
from .llm_standin import LLMStandIn
from .net import free_port, wait_http
from .payloads import attachment, message_payload
from .processes import operator_env, spawn_service, stop
from .redis_server import RedisServer


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.time()
        self.events: list[tuple[float, str, str]] = []

    def add(self, at: float, who: str, what: str) -> None:
        self.events.append((at, who, what))

    def print(self) -> None:
        print("\nTimeline (seconds since the first message)")
        print("-" * 78)
        for at, who, what in sorted(self.events):
            print(f"{at - self.t0:8.3f}s  {who:<10} {what}")
        print("-" * 78)


def _shown(content: object) -> str:
    """A prompt message for the timeline: image parts as their size, not their bytes."""
    if not isinstance(content, list):
        return repr(content)
    return "[" + ", ".join(
        repr(p.get("text")) if p.get("type") == "text"
        else f"<image, {len(p['image_url']['url']) * 3 // 4 // 1024} KB inline>" for p in content) + "]"


# A few bytes that say what the stand-in's "transcription" of them returns.
_VOICE_NOTE = "the box arrived broken, the lid is completely crushed"
_PHOTO = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64


async def run_demo(window_ms: int) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="buffer-demo-"))
    redis = RedisServer(workdir).start()
    llm, chatwoot = LLMStandIn(api_key="demo-llm-key"), ChatwootStandIn(token="demo-chatwoot-token")
    await llm.start()
    await chatwoot.start()
    llm.transcription_delay = window_ms / 2000  # a transcription that takes half the window
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
        MESSAGE_BUFFER_DURATION_MS=window_ms,
        BUFFER_PROCESSING_INTERVAL_MS=10000,
        LOG_FORMAT="json",
    )
    log_path = workdir / "service.log"
    print(f"redis-server on 127.0.0.1:{redis.port} (repo redis.conf, data in {workdir})")
    print(f"LLM stand-in at {llm.base_url}/v1, Chatwoot stand-in at {chatwoot.base_url}")
    print(f"buffer-service serve on {service_url}, MESSAGE_BUFFER_DURATION_MS={window_ms}")
    service = spawn_service(["serve"], env, log_path)
    timeline = Timeline()
    try:
        async def service_alive() -> None:
            if service.poll() is not None:
                raise RuntimeError(f"buffer-service exited during start-up; see {log_path}")

        await wait_http(f"{service_url}/readyz", timeout=20, interval=0.1, alive=service_alive)
        timeline.t0 = time.time()
        voice = attachment("audio", data_url=chatwoot.add_file(_VOICE_NOTE.encode(), "voice.ogg",
                                                               "audio/ogg"))
        photo = attachment("image", data_url=chatwoot.add_file(_PHOTO, "photo.png", "image/png"))
        burst = [(245, "Oi! I ordered last week", None), (245, None, voice),
                 (245, "order #5521, look:", photo), (312, "hello, do you open on Sunday?", None),
                 (245, "what now?", None), (312, "and until what time?", None)]
        async with aiohttp.ClientSession() as session:
            for i, (conv, text, media) in enumerate(burst):
                payload = message_payload(message_id=90_000 + i, conversation_id=conv, content=text,
                                          sender_name="Maria" if conv == 245 else "João",
                                          attachments=[media] if media else None)
                if media:
                    kind = {"audio": "voice note", "image": "photo"}[media["file_type"]]
                    text = f"{text or ''} [{kind}]".strip()
                sent = time.time()
                async with session.post(f"{service_url}/webhooks/chatwoot", json=payload) as resp:
                    body = await resp.json()
                timeline.add(sent, "webhook", f"conv {conv} <- {text!r}: HTTP {resp.status} "
                             f"{body['status']} ({body.get('buffered_messages')} in buffer, flush in "
                             f"{body.get('flush_in_ms')} ms), answered in "
                             f"{(time.time() - sent) * 1000:.1f} ms")
                await asyncio.sleep(0.6)
        deadline = time.monotonic() + window_ms / 1000 + 15
        while len(chatwoot.posts) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # let the echoes of the replies arrive
        await chatwoot.wait_echoes()
    finally:
        stop(service, 15)
        await llm.stop()
        await chatwoot.stop()
        redis.stop()

    for call in llm.calls:
        users = [_shown(m["content"]) for m in call.messages if m["role"] == "user"]
        timeline.add(call.at, "llm", f"1 call with {len(users)} user messages: {', '.join(users)}")
    for tx in llm.transcriptions:
        timeline.add(tx.at, "llm", f"transcription of {tx.filename} ({tx.size} bytes) started")
        timeline.add(tx.done_at, "llm", f"transcription of {tx.filename} done (HTTP {tx.status})")
    for post in chatwoot.posts:
        timeline.add(post.at, "chatwoot", f"reply posted to conv {post.conversation_id}: "
                     f"{post.body['content']!r} (message id {post.message_id})")
    for line in log_path.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError, KeyError, ValueError, TypeError):
            entry = orjson.loads(line)
            at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
            event = entry.get("event")
            if event == "reply_posted":
                timeline.add(at, "worker", f"batch {entry['batch']} of conv {entry['conversation']} "
                             f"flushed by {entry['trigger']} ({entry['messages']} messages, "
                             f"{entry['lateness_ms']} ms after its deadline), reply posted")
            elif event == "webhook" and entry.get("reason") == "outgoing":
                timeline.add(at, "webhook", f"conv {entry['conversation']} <- the bot's own reply "
                             "echoed by Chatwoot: ignored (kept as history)")
    timeline.print()
    ok = len(llm.calls) == 2 and len(chatwoot.posts) == 2
    print(f"\n{len(burst)} messages in 2 conversations -> {len(llm.calls)} LLM calls, "
          f"{len(chatwoot.posts)} replies. Service log: {log_path}")
    if not ok:
        print("UNEXPECTED: expected exactly 2 LLM calls and 2 replies", file=sys.stderr)
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window-ms", type=int, default=2000,
                        help="MESSAGE_BUFFER_DURATION_MS for the demo (production default 30000)")
    args = parser.parse_args()
    sys.exit(asyncio.run(run_demo(args.window_ms)))


if __name__ == "__main__":
    main()
