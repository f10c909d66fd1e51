"""Voice notes, images and every other attachment of a burst reach the model, in order.

Real redis-server, the real `openai` client against the LLM stand-in (chat completions and
`/v1/audio/transcriptions`), attachment files served by the Chatwoot stand-in behind
ActiveStorage's redirect, the service in-process or as real processes.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import orjson
import pytest
from helpers import service_env, wait_for
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from buffer_service.attachments import Attachment
from buffer_service.chatwoot import classify
from buffer_service.config import ConfigError, Settings
from buffer_service.downloads import Downloader, DownloadError, is_public
from buffer_service.store import BufferStore
from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMStandIn
from devtools.net import free_port, wait_http
from devtools.payloads import attachment, message_payload
from devtools.processes import spawn_service

PNG_1 = b"\x89PNG\r\n\x1a\n" + b"first photo" * 20
PNG_2 = b"\x89PNG\r\n\x1a\n" + b"second photo" * 20


def voice(chatwoot: ChatwootStandIn, words: str, **extra: object) -> dict:
    # The LLM stand-in's transcript of a file is the file's bytes read as text.
    return attachment("audio", data_url=chatwoot.add_file(words.encode(), "voice.ogg", "audio/ogg"),
                      **extra)


def photo(chatwoot: ChatwootStandIn, data: bytes = PNG_1, **extra: object) -> dict:
    return attachment("image", data_url=chatwoot.add_file(data, "photo.png", "image/png"), **extra)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user_contents(call) -> list:
    return [m["content"] for m in call.messages if m["role"] == "user"]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def job_records(redis: Redis) -> list[dict[str, str]]:
    return await BufferStore(redis, Settings()).job_records()


async def test_a_mixed_burst_is_one_call_with_everything_in_arrival_order(
        settings, make_service, llm: LLMStandIn, chatwoot: ChatwootStandIn):
    svc = await make_service(settings)
    messages = [
        dict(content="hi, my bike arrived like this"),
        dict(content=None, attachments=[voice(chatwoot, "the front wheel is bent, is this covered?")]),
        dict(content="see", attachments=[photo(chatwoot, PNG_1)]),
        dict(content=None, attachments=[photo(chatwoot, PNG_2)]),
        dict(content=None, attachments=[attachment("location")]),
    ]
    for i, fields in enumerate(messages):
        body = await svc.webhook(message_payload(message_id=1000 + i, conversation_id=30, **fields))
        assert body["status"] == "buffered"
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    await asyncio.sleep(0.3)
    assert len(llm.calls) == 1 and len(chatwoot.posts) == 1
    call = llm.calls[0]
    assert user_contents(call) == [
        "hi, my bike arrived like this",
        "[voice note] the front wheel is bent, is this covered?",
        [{"type": "text", "text": "[image]"},
         {"type": "image_url", "image_url": {"url": data_uri(PNG_1)}},
         {"type": "text", "text": "see"}],
        [{"type": "text", "text": "[image]"},
         {"type": "image_url", "image_url": {"url": data_uri(PNG_2)}}],
        "[location: Avenida Paulista, 1000, São Paulo (-23.5505, -46.6333)]",
    ]
    assert call.images == [data_uri(PNG_1), data_uri(PNG_2)]
    # One transcription, sent as the openai client sends it.
    assert len(llm.transcriptions) == 1
    tx = llm.transcriptions[0]
    assert (tx.model, tx.filename, tx.content_type, tx.status) == (
        settings.transcription_model, "voice.ogg", "audio/ogg", 200)
    # Every file came through ActiveStorage's redirect, from the Chatwoot host only.
    assert sum("/blobs/redirect/" in r.path for r in chatwoot.file_requests) == 3
    assert sum("/disk/" in r.path for r in chatwoot.file_requests) == 3

    # The next burst's history holds what the model understood, as text: no image bytes.
    await svc.webhook(message_payload(message_id=1010, conversation_id=30, content="hello?"))
    await wait_for(lambda: len(chatwoot.posts) == 2, timeout=10)
    assert [m["content"] for m in llm.calls[1].messages[1:]] == [
        "hi, my bike arrived like this",
        "[voice note] the front wheel is bent, is this covered?",
        "[image] see", "[image]",
        "[location: Avenida Paulista, 1000, São Paulo (-23.5505, -46.6333)]",
        chatwoot.posts[0].body["content"], "hello?"]
    assert llm.calls[1].images == [] and len(llm.transcriptions) == 1


async def test_a_slow_transcription_delays_the_reply_only_by_what_remains_at_the_deadline(
        settings, make_service, llm: LLMStandIn, chatwoot: ChatwootStandIn):
    window_s = settings.buffer_duration_ms / 1000
    llm.transcription_delay = 2.0  # twice the window
    svc = await make_service(settings)
    sent = time.time()
    body = await svc.webhook(message_payload(message_id=1, conversation_id=31, content=None,
                                             attachments=[voice(chatwoot, "can I pay by card?")]))
    acknowledged = time.time()
    assert body["status"] == "buffered"
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    tx, call = llm.transcriptions[0], llm.calls[0]
    # The webhook did not wait for the transcription, which started on arrival, not at the deadline.
    assert acknowledged < tx.done_at
    assert tx.at - sent < window_s
    # The LLM call waited for the transcript, then went at once: the window and the transcription
    # overlapped (one after the other would be window + 2 s after sending).
    assert call.at >= tx.done_at
    assert call.at - sent < window_s + llm.transcription_delay - 0.2, call.at - sent
    assert user_contents(call) == ["[voice note] can I pay by card?"]


async def test_a_recorded_transcript_is_not_paid_for_twice(
        settings, make_service, llm: LLMStandIn, chatwoot: ChatwootStandIn, redis: Redis):
    llm.fail_next(1, 500)  # the first answer of the burst fails: the batch is retried
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    await svc.webhook(message_payload(message_id=2, conversation_id=32, content=None,
                                      attachments=[voice(chatwoot, "my order number is 5521")]))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    assert len(llm.calls) == 2 and len(llm.transcriptions) == 1
    assert user_contents(llm.calls[1]) == ["[voice note] my order number is 5521"]
    # The next burst's history still reads the transcript, not a placeholder and no bytes.
    await svc.webhook(message_payload(message_id=3, conversation_id=32, content="and?"))
    await wait_for(lambda: len(chatwoot.posts) == 2, timeout=10)
    history = [m["content"] for m in llm.calls[2].messages[1:-1]]
    assert history[0] == "[voice note] my order number is 5521"
    assert len(llm.transcriptions) == 1


async def test_a_download_that_failed_for_a_passing_reason_is_tried_again_for_the_burst(
        settings, make_service, llm: LLMStandIn, chatwoot: ChatwootStandIn, redis: Redis):
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    chatwoot.fail_next(1, 503)  # Chatwoot's storage hiccups when the voice note arrives
    await svc.webhook(message_payload(message_id=7, conversation_id=36, content=None,
                                      attachments=[voice(chatwoot, "two pizzas, please")]))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    assert [r.status for r in chatwoot.requests][:2] == [503, 302]
    assert user_contents(llm.calls[0]) == ["[voice note] two pizzas, please"]
    assert len(llm.transcriptions) == 1
    assert "media" not in (await job_records(redis))[0]


async def test_chatwoots_own_transcript_is_used_without_a_call(
        settings, make_service, llm: LLMStandIn, chatwoot: ChatwootStandIn):
    svc = await make_service(replace(settings, buffer_duration_ms=200))
    att = voice(chatwoot, "not this", transcribed_text="I want to cancel my order")
    await svc.webhook(message_payload(message_id=4, conversation_id=33, content=None, attachments=[att]))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    assert user_contents(llm.calls[0]) == ["[voice note] I want to cancel my order"]
    assert llm.transcriptions == [] and chatwoot.file_requests == []


async def test_a_worker_killed_while_a_transcription_runs_loses_nothing(
        settings, llm: LLMStandIn, chatwoot: ChatwootStandIn, tmp_path: Path):
    llm.transcription_delay = 60  # the first attempt never finishes: its process is killed
    env = service_env(settings)
    proc = spawn_service(["serve"], env, tmp_path / "first.log")
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{settings.port}"
            await wait_http(url + "/healthz")
            payload = message_payload(message_id=5, conversation_id=34, content=None,
                                      attachments=[voice(chatwoot, "is the store open today?")])
            async with session.post(url + "/webhooks/chatwoot", json=payload) as resp:
                assert (await resp.json())["status"] == "buffered"
            await wait_for(lambda: len(llm.transcriptions) == 1, timeout=5)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            llm.transcription_delay = 0
            # The replacement finds the burst due and the transcription unfinished: its claim
            # lapses (PROCESSING_LEASE_MS) and the worker does it again.
            proc = spawn_service(["serve"], env, tmp_path / "second.log")
            await wait_for(lambda: len(chatwoot.posts) == 1, timeout=settings.processing_lease_ms / 1000 + 15)
            await asyncio.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert len(chatwoot.posts) == 1 and len(llm.calls) == 1
    assert user_contents(llm.calls[0]) == ["[voice note] is the store open today?"]
    assert len(llm.transcriptions) == 2 and llm.transcriptions[0].status == 0  # never answered


async def test_a_transcription_cut_short_by_shutdown_is_released_and_redone(
        settings, make_service, llm: LLMStandIn, chatwoot: ChatwootStandIn, redis: Redis):
    llm.transcription_delay = 60
    svc = await make_service(replace(settings, buffer_duration_ms=3000))
    await svc.webhook(message_payload(message_id=6, conversation_id=35, content=None,
                                      attachments=[voice(chatwoot, "do you deliver on Saturdays?")]))
    await wait_for(lambda: len(llm.transcriptions) == 1, timeout=5)
    await svc.close()  # SIGTERM: the transcription gets SHUTDOWN_GRACE_S / 2, then is cancelled
    # Its claim is handed back at once, not left to lapse: the next process need not wait.
    assert [k async for k in redis.scan_iter(match="bs:*:txclaim:*")] == []
    assert [k async for k in redis.scan_iter(match="bs:*:tx:*")] == []
    llm.transcription_delay = 0
    await make_service(replace(settings, port=free_port()))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    assert user_contents(llm.calls[0]) == ["[voice note] do you deliver on Saturdays?"]
    assert len(llm.transcriptions) == 2


async def test_every_kind_of_failure_still_gets_one_reply(
        settings, make_service, llm: LLMStandIn, chatwoot: ChatwootStandIn, redis: Redis):
    before = {reason: metric("buffer_service_transcriptions_total", outcome="failed", reason=reason)
              for reason in ("http_error", "transcription_failed")}
    refused_before = metric("buffer_service_image_input_refused_total")
    llm.refuse_images = True
    svc = await make_service(replace(settings, max_media_bytes=2048))
    missing = attachment("audio", data_url=f"{chatwoot.base_url}/rails/active_storage/blobs/"
                         "redirect/gone/voice.ogg")
    failing = voice(chatwoot, "this one the transcription server fails")
    big = photo(chatwoot, b"\x89PNG" + b"x" * 4096)
    cases = {
        40: ([missing], "[voice note: could not be transcribed] hello?", "HTTP 404"),
        41: ([failing], "[voice note: could not be transcribed] hello?", "InternalServerError"),
        42: ([big], "[image: could not be loaded] hello?", "MAX_MEDIA_BYTES"),
        43: ([photo(chatwoot)], "[image: could not be shown] hello?", "image input refused"),
    }
    # The failing transcription is the only one that reaches the transcription server. A 500
    # is not paid for: it is tried on arrival and once more when the burst is answered.
    llm.fail_transcriptions(2, 500)
    for conv, (atts, _, _) in cases.items():
        await svc.webhook(message_payload(message_id=conv, conversation_id=conv, content="hello?",
                                          attachments=atts))
    await wait_for(lambda: len(chatwoot.posts) == len(cases), timeout=10)
    await asyncio.sleep(0.5)
    assert sorted(p.conversation_id for p in chatwoot.posts) == sorted(cases)
    for conv, (_, text, _) in cases.items():
        assert chatwoot.posts_for(conv)[0].body["content"] == f"Reply to: {text}"
    # The refused image: asked once with it, once more with it named in text; nothing else twice.
    assert len(llm.calls) == len(cases) + 1
    assert [c.status for c in llm.calls if c.images] == [400]
    records = {int(r["conv"].split(":")[1]): r for r in await job_records(redis)}
    for conv, (_, _, why) in cases.items():
        assert records[conv]["state"] == "completed"
        assert why in records[conv]["media"], records[conv]
    assert [t.status for t in llm.transcriptions] == [500, 500]
    for reason, attempts in (("http_error", 1), ("transcription_failed", 2)):
        assert metric("buffer_service_transcriptions_total", outcome="failed",
                      reason=reason) == before[reason] + attempts
    assert metric("buffer_service_image_input_refused_total") == refused_before + 1


async def test_images_by_url_without_vision_and_over_the_cap(
        settings, make_service, llm: LLMStandIn, chatwoot: ChatwootStandIn):
    first, second = photo(chatwoot, PNG_1), photo(chatwoot, PNG_2)
    svc = await make_service(replace(settings, image_input="url", max_images_per_burst=1))
    for i, att in enumerate((first, second)):
        await svc.webhook(message_payload(message_id=50 + i, conversation_id=50, content=None,
                                          attachments=[att]))
    await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
    assert llm.calls[0].images == [first["data_url"]]  # the provider fetches it itself
    assert user_contents(llm.calls[0])[1] == "[image: not shown, more than 1 images in these messages]"
    assert chatwoot.file_requests == []
    await svc.close()  # one worker at a time on this Redis

    svc = await make_service(replace(settings, vision=False, port=free_port()))
    await svc.webhook(message_payload(message_id=52, conversation_id=51, content="this one",
                                      attachments=[photo(chatwoot)]))
    await wait_for(lambda: len(chatwoot.posts) == 2, timeout=10)
    assert user_contents(llm.calls[1]) == ["[image] this one"] and not llm.calls[1].images
    assert chatwoot.file_requests == []


async def test_attachment_urls_elsewhere_are_never_fetched(
        settings, make_service, llm: LLMStandIn, chatwoot: ChatwootStandIn):
    # Another local service (another port on the same host), which must never see a request.
    async with ChatwootStandIn() as other:
        secret = other.add_file(b"internal", "secret.png", "image/png")
        hostile = [
            secret,  # another local port
            "file:///etc/passwd",
            "http://10.1.2.3/photo.png",  # a private address
            "http://169.254.169.254/latest/meta-data/",
            chatwoot.add_file(b"", "a.png", "image/png", redirect_to=secret),  # redirect into one
            *(chatwoot.add_file(b"", "b.png", "image/png", redirect_to=secret.replace("127.0.0.1", host))
              for host in ("localhost", "0x7f000001", "[::ffff:127.0.0.1]")),  # names of loopback
            chatwoot.add_file(b"", "c.png", "image/png",
                              redirect_to="http://169.254.169.254/latest/meta-data/"),
            chatwoot.add_file(b"", "d.png", "image/png", redirect_to="file:///etc/passwd"),
        ]
        svc = await make_service(settings)
        for i, url in enumerate(hostile):
            kind = "audio" if i % 2 else "image"
            await svc.webhook(message_payload(message_id=60 + i, conversation_id=60 + i, content="x",
                                              attachments=[attachment(kind, data_url=url)]))
        await wait_for(lambda: len(chatwoot.posts) == len(hostile), timeout=10)
        assert other.requests == []
    for post in chatwoot.posts:
        assert post.body["content"] in ("Reply to: [image: could not be loaded] x",
                                        "Reply to: [voice note: could not be transcribed] x")
    assert llm.transcriptions == [] and all(not c.images for c in llm.calls)


async def test_the_token_goes_to_chatwoot_only_and_another_allowed_host_serves_files(
        settings, make_service, llm: LLMStandIn, chatwoot: ChatwootStandIn):
    # Chatwoot's FRONTEND_URL or its storage on another host (an S3 stand-in): allowed by name.
    async with ChatwootStandIn() as storage:
        stored = storage.add_file(PNG_1, "photo.png", "image/png")
        redirected = chatwoot.add_file(b"", "photo.png", "image/png", redirect_to=stored)
        allowed = frozenset({storage.base_url.removeprefix("http://")})
        svc = await make_service(replace(settings, media_allowed_hosts=allowed))
        await svc.webhook(message_payload(message_id=70, conversation_id=70, content=None,
                                          attachments=[attachment("image", data_url=redirected)]))
        await wait_for(lambda: len(chatwoot.posts) == 1, timeout=10)
        assert llm.calls[0].images == [data_uri(PNG_1)]
        assert [r.token_sent for r in chatwoot.file_requests] == [True]
        assert storage.file_requests and not any(r.token_sent for r in storage.file_requests)


async def test_the_spend_guard_counts_transcriptions(
        settings, make_service, llm: LLMStandIn, chatwoot: ChatwootStandIn, redis: Redis):
    svc = await make_service(replace(settings, max_llm_calls_per_conversation_per_hour=1))
    await svc.webhook(message_payload(message_id=80, conversation_id=80, content=None,
                                      attachments=[voice(chatwoot, "hello")]))
    for _ in range(200):
        records = await job_records(redis)
        if records and records[0].get("state") == "skipped":
            break
        await asyncio.sleep(0.05)
    # The voice note's transcription used the conversation's one call of the hour.
    assert len(llm.transcriptions) == 1 and llm.calls == []
    assert [r.get("reason") for r in records] == ["llm_quota_exceeded"]


# -- the downloader and the parts, without the service ------------------------------------------


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.0.0.1", False),
    ("172.16.5.4", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("::1", False), ("fd00:ec2::254", False), ("::ffff:127.0.0.1", False),
    ("fe80::1%eth0", False), ("224.0.0.1", False), ("not an address", False)])
def test_public_addresses(address: str, public: bool):
    assert is_public(address) is public


async def test_downloads_stop_at_the_size_cap_even_without_a_content_length(chatwoot: ChatwootStandIn):
    settings = Settings(chatwoot_base_url=chatwoot.base_url, max_media_bytes=1024)
    downloader = Downloader(settings)
    try:
        ok = await downloader.fetch(chatwoot.add_file(b"a" * 1024, "ok.ogg", "audio/ogg"))
        assert ok.data == b"a" * 1024 and ok.content_type == "audio/ogg"
        with pytest.raises(DownloadError) as too_large:
            await downloader.fetch(chatwoot.add_file(b"a" * 1025, "big.ogg", "audio/ogg"))
        assert too_large.value.reason == "too_large"
        with pytest.raises(DownloadError) as refused:
            await downloader.fetch("gopher://" + chatwoot.base_url.removeprefix("http://") + "/x")
        assert refused.value.reason == "refused"
    finally:
        await downloader.close()


def test_attachments_are_kept_whole_and_capped(settings):
    payload = message_payload(message_id=1, conversation_id=1, content="here", attachments=[
        attachment("location"), attachment("contact"),
        attachment("file", data_url="https://c.example/rails/x/invoice%20May.pdf", file_size=250_000),
        attachment("video"), attachment("audio", transcribed_text="hi"),
        attachment("fallback", fallback_title="x" * 5000)])
    msg = classify(payload, settings).message
    assert msg is not None
    assert msg.text == ("[location: Avenida Paulista, 1000, São Paulo (-23.5505, -46.6333)] "
                        "[contact card: João Silva, +5511912345678] "
                        "[file: invoice May.pdf (application/pdf, 244 KB)] [video] [voice note] hi "
                        f"[fallback: {'x' * 200}] here")
    entry = orjson.loads(msg.to_json())
    assert [Attachment.from_dict(a) for a in entry["att"]] == list(msg.attachments)
    # A hostile payload's attachment fields of the wrong type are dropped, not stored.
    odd = Attachment.from_payload({"file_type": "image", "data_url": 5, "coordinates_lat": "nan",
                                   "file_size": True, "meta": "x"})
    assert odd == Attachment("image")


def test_media_settings_from_the_environment():
    s = Settings.from_env({"TRANSCRIPTION_MODEL": "off", "IMAGE_INPUT": "url", "VISION": "off",
                           "MEDIA_ALLOWED_HOSTS": "files.example.com, https://cw.example.com:8443,"
                                                  "10.0.0.5:3000", "MEDIA_TIMEOUT_S": "5"})
    assert not s.transcription and s.image_input == "url" and not s.vision and s.media_timeout_s == 5
    assert s.media_allowed_hosts == {"files.example.com:80", "files.example.com:443",
                                     "cw.example.com:8443", "10.0.0.5:3000"}
    defaults = Settings.from_env({})
    assert defaults.transcription_model == "gpt-4o-mini-transcribe"
    assert (defaults.max_media_bytes, defaults.max_images_per_burst) == (25 * 1024 * 1024, 8)
    for env in ({"IMAGE_INPUT": "base64"}, {"MEDIA_ALLOWED_HOSTS": "host:port"},
                {"MAX_MEDIA_BYTES": "10"}):
        with pytest.raises(ConfigError, match=next(iter(env))):
            Settings.from_env(env)
