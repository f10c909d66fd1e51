"""Configuration: operators' variable names, defaults, and one clear line per mistake."""

from __future__ import annotations

import subprocess
import sys

import pytest

from buffer_service.config import ConfigError, Settings

WORKER_ENV = {"OPENAI_API_KEY": "sk-test", "CHATWOOT_BASE_URL": "https://cw.example.com",
              "CHATWOOT_API_TOKEN": "tok"}


def test_defaults_match_the_documented_ones():
    s = Settings.from_env({})
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert (s.host, s.port) == ("0.0.0.0", 8080)
    assert s.openai_model == "gpt-4o-mini"
    assert s.buffer_duration_ms == 30_000
    assert s.processing_interval_ms == 10_000
    assert s.max_buffer_size == 50
    assert s.max_buffer_age_ms == 300_000
    assert s.bot_conversation_statuses == {"pending", "open"}


def test_values_are_read_from_the_environment(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Be brief.\n")
    s = Settings.from_env({**WORKER_ENV, "MESSAGE_BUFFER_DURATION_MS": "5000", "MAX_BUFFER_SIZE": "7",
                           "MAX_BUFFER_AGE_MS": "60000", "BOT_CONVERSATION_STATUSES": "pending",
                           "CHATWOOT_ACCOUNT_ID": "3", "SYSTEM_PROMPT_FILE": str(prompt),
                           "OPENAI_BASE_URL": "http://llm.local:8000/v1/"})
    assert (s.buffer_duration_ms, s.max_buffer_size, s.max_buffer_age_ms) == (5000, 7, 60000)
    assert s.bot_conversation_statuses == {"pending"}
    assert s.chatwoot_account_id == 3
    assert s.system_prompt == "Be brief."
    assert s.openai_base_url == "http://llm.local:8000/v1"
    s.require_worker()


@pytest.mark.parametrize(("env", "variable"), [
    ({"MESSAGE_BUFFER_DURATION_MS": "thirty"}, "MESSAGE_BUFFER_DURATION_MS"),
    ({"MAX_BUFFER_SIZE": "0"}, "MAX_BUFFER_SIZE"),
    ({"PORT": "-1"}, "PORT"),
    ({"REDIS_URL": "http://localhost"}, "REDIS_URL"),
    ({"CHATWOOT_BASE_URL": "chatwoot.example.com"}, "CHATWOOT_BASE_URL"),
    ({"BOT_CONVERSATION_STATUSES": "pending,closed"}, "BOT_CONVERSATION_STATUSES"),
    ({"MAX_BUFFER_AGE_MS": "1000"}, "MAX_BUFFER_AGE_MS"),
    ({"SYSTEM_PROMPT_FILE": "/nonexistent/prompt.txt"}, "SYSTEM_PROMPT_FILE"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
])
def test_invalid_values_name_the_variable(env, variable):
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert str(err.value).startswith(variable + ":")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("missing", ["OPENAI_API_KEY", "CHATWOOT_BASE_URL", "CHATWOOT_API_TOKEN"])
def test_a_worker_needs_llm_and_chatwoot_settings(missing):
    env = {k: v for k, v in WORKER_ENV.items() if k != missing}
    with pytest.raises(ConfigError, match=f"^{missing}:"):
        Settings.from_env(env).require_worker()
    Settings.from_env(env)  # the HTTP side alone starts without them


def test_redacted_settings_hide_secrets():
    dump = Settings.from_env(WORKER_ENV).redacted()
    assert dump["openai_api_key"] == "<set>" and dump["chatwoot_api_token"] == "<set>"
    assert "sk-test" not in repr(Settings.from_env(WORKER_ENV))


def test_cli_stops_with_one_line_naming_the_variable():
    env = {"PATH": "/usr/bin:/bin", "MAX_BUFFER_SIZE": "lots", **WORKER_ENV}
    proc = subprocess.run([sys.executable, "-m", "buffer_service.cli", "serve"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "buffer-service: configuration error: MAX_BUFFER_SIZE: expected a whole number, got 'lots'"]
    proc = subprocess.run([sys.executable, "-m", "buffer_service.cli", "worker"],
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "OPENAI_API_KEY" in proc.stderr
