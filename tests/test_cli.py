"""The operator's command line and the redis-cli scripts, run as real processes against a live
Redis while the service runs (the CLI talks to Redis directly; no server is needed)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

from helpers import ROOT, cli_json, eventually, ops_env, run_cli, run_process, wait_for

from buffer_service.config import Settings
from buffer_service.flags import MAX_AGE_S, Flags
from devtools.net import free_port
from devtools.payloads import message_payload

SCRIPTS = ROOT / "scripts"


async def run_script(settings: Settings, name: str, *args: str) -> tuple[int, str, str]:
    return await run_process(["bash", str(SCRIPTS / name), *args], ops_env(settings))


async def test_cli_shows_and_steers_a_running_service(settings, make_service, llm, chatwoot, redis):
    # A window longer than the test: on a loaded machine its CLI calls take half a minute.
    svc = await make_service(replace(settings, buffer_duration_ms=90_000, max_buffer_age_ms=180_000))
    for i, text in enumerate(["hello", "are you there?"]):
        await svc.webhook(message_payload(message_id=10 + i, conversation_id=7, content=text))
    await svc.webhook(message_payload(message_id=20, conversation_id=8, content="other"))

    rows = await cli_json(settings, "buffers")
    by_conv = {r["conversation"]: r for r in rows}
    assert by_conv["1:7"]["messages"] == 2 and by_conv["1:8"]["messages"] == 1
    assert 80_000 < by_conv["1:7"]["due_in_ms"] <= 90_000
    code, out, _ = await run_cli(settings, "buffers")
    assert code == 0 and "CONVERSATION" in out and "1:7" in out and "DEADLINE" in out

    one = await cli_json(settings, "buffers", "1:7")
    assert [m["text"] for m in one["messages"]] == ["hello", "are you there?"]
    code, out, _ = await run_cli(settings, "buffers", "1:7")
    assert "are you there?" in out and "deadline_at" in out

    # Flags: list, set (seen by the running service), refuse nonsense.
    flags = {f["name"]: f["value"] for f in await cli_json(settings, "flags")}
    assert flags == {"message_buffering": "on", "response_quality_enhancement": "on",
                     "processing": "on", "buffering_inboxes": "", "buffering_percent": "100"}
    assert await cli_json(settings, "flags", "set", "buffering_percent", "25") == {
        "name": "buffering_percent", "value": "25"}
    assert (await Flags(redis, settings).current()).buffering_percent == 25
    code, _, err = await run_cli(settings, "flags", "set", "message_buffering", "maybe")
    assert code == 1 and "expected on or off" in err
    code, _, err = await run_cli(settings, "flags", "set", "no_such_flag", "on")
    assert code == 1 and "unknown flag" in err
    code, out, _ = await run_cli(settings, "flags")
    assert "buffering_percent" in out and "25" in out and "WHAT IT DOES" in out

    # Processing off: a flush is accepted but nothing is answered until it is on again.
    assert await cli_json(settings, "processing", "off") == {"processing": "off"}
    await asyncio.sleep(MAX_AGE_S)  # what the switch promises: every worker, within a second
    code, out, _ = await run_cli(settings, "flush", "1:7")
    assert code == 0 and "processing is off" in out
    await asyncio.sleep(1.5)
    assert chatwoot.posts == []
    assert await cli_json(settings, "processing", "on") == {"processing": "on"}
    await wait_for(lambda: len(chatwoot.posts_for(7)) == 1, timeout=5)
    assert chatwoot.posts_for(8) == []  # its window is still open

    jobs = await cli_json(settings, "jobs", "--status", "completed")
    assert [(j["conversation"], j["trigger"], j["messages"]) for j in jobs] == [("1:7", "manual", 2)]
    job = await cli_json(settings, "jobs", jobs[0]["id"])
    assert job["reply_message_id"] == chatwoot.posts_for(7)[0].message_id
    code, out, _ = await run_cli(settings, "jobs")
    assert jobs[0]["id"] in out and "completed" in out

    assert await cli_json(settings, "flush") == {"due_buffers": 0, "processing": True}
    code, _, err = await run_cli(settings, "flush", "1:999")
    assert code == 1 and "no pending messages" in err
    code, _, err = await run_cli(settings, "jobs", "3-999999")
    assert code == 1 and "no job 3-999999" in err
    code, _, err = await run_cli(settings, "retry", "nonsense")
    assert code == 1 and "job id" in err

    stats = await cli_json(settings, "stats")
    assert stats["active"]["buffering"] == 1 and stats["totals"]["bursts"] == 1
    code, out, _ = await run_cli(settings, "stats")
    assert code == 0 and "Active:" in out and "MSGS/BURST" in out and "2.0" in out

    assert await cli_json(settings, "cleanup") == {"completed_index": 0, "skipped_index": 0,
                                                    "failed_purged": 0}
    webhooks = await cli_json(settings, "log", "webhooks")
    assert [w["outcome"] for w in webhooks] == ["buffered"] * 3
    code, out, _ = await run_cli(settings, "log", "webhooks")
    assert "OUTCOME" in out and "buffered" in out


async def test_cli_reports_an_unreachable_redis_in_one_line(settings):
    code, out, err = await run_cli(replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0"),
                                   "stats")
    assert code == 1 and out == ""
    assert err.startswith("buffer-service: Redis at REDIS_URL is unavailable") and err.count("\n") == 1


async def test_service_commands_keep_their_shape(settings):
    code, out, _ = await run_cli(settings, "--help")
    assert code == 0
    for command in ("serve", "worker", "stats", "buffers", "jobs", "retry", "flags", "processing",
                    "flush", "cleanup"):
        assert command in out
    code, out, _ = await run_cli(settings, "serve", "--help")
    assert code == 0 and "--no-worker" in out


async def test_redis_cli_scripts_print_a_live_buffer(settings, make_service, llm, chatwoot, redis):
    # A window longer than the test: on a loaded machine its CLI calls take half a minute.
    svc = await make_service(replace(settings, buffer_duration_ms=90_000, max_buffer_age_ms=180_000))
    await svc.webhook(message_payload(message_id=1, conversation_id=42, content="first line"))
    await svc.webhook(message_payload(message_id=2, conversation_id=42, content="second line"))

    code, out, err = await run_script(settings, "active-buffers.sh")
    assert code == 0, err
    line = next(row for row in out.splitlines() if row.startswith("1:42"))
    _, count, *_, due_in = line.split()
    assert count == "2" and 80_000 < int(due_in) <= 90_000 and "UTC" in line

    code, out, err = await run_script(settings, "conversation.sh", "1:42")
    assert code == 0, err
    assert "first line" in out and "second line" in out and "deadline" in out
    assert out.index("first line") < out.index("second line")
    # The compact buffer's head is no message, and it names the first message's time.
    assert "buffered        2 message(s)" in out and "first message   20" in out
    code, out, _ = await run_script(settings, "conversation.sh", "1:43")
    assert code == 0 and "no buffered messages" in out

    code, out, _ = await run_script(settings, "flags.sh")
    assert code == 0 and "processing" in out and "default" in out
    code, out, _ = await run_script(settings, "set-flag.sh", "processing", "off")
    assert code == 0 and "processing = off" in out
    assert not (await Flags(redis, settings).current()).processing
    code, out, _ = await run_script(settings, "flags.sh")
    assert any(row.split()[:3] == ["processing", "off", "set"] for row in out.splitlines())
    code, _, err = await run_script(settings, "set-flag.sh", "processing", "perhaps")
    assert code == 2 and "on or off" in err
    await run_script(settings, "set-flag.sh", "processing", "on")

    # A failed job, as the scripts show it.
    llm.fail_next(1, status=400)
    await svc.webhook(message_payload(message_id=3, conversation_id=44, content="doomed"))
    assert (await run_cli(settings, "flush", "1:44"))[0] == 0
    jobs = await eventually(lambda: cli_json(settings, "jobs", "--status", "failed"))
    assert len(jobs) == 1
    code, out, _ = await run_script(settings, "failed-jobs.sh")
    assert code == 0
    row = next(r for r in out.splitlines() if r.startswith(jobs[0]["id"] + " "))
    assert "1:44" in row and "HTTP 400" in row


def test_scripts_document_themselves_in_one_line():
    for path in sorted(Path(SCRIPTS).glob("*.sh")):
        lines = path.read_text().splitlines()
        if path.name == "redis-common.sh":
            continue
        assert lines[0] == "#!/usr/bin/env bash" and lines[1].startswith("# "), path.name
        assert os.access(path, os.X_OK), path.name
