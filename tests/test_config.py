"""Configuration: operators' variable names, defaults, and one clear line per mistake."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from buffer_service.config import DECLARED, INBOX_KEYS, ConfigError, Settings, markdown_table

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


# -- the declarations ---------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_TOML = ROOT / "docs" / "inbox-settings.example.toml"


def test_readme_table_lists_exactly_the_declared_settings_with_their_defaults():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("| variable | default | meaning |")
    table = readme[start:readme.index("\n\n", start)]
    # On failure: paste the output of `python -m buffer_service.config` into README.md.
    assert table == markdown_table()
    rows = [line.split(" | ")[:2] for line in table.splitlines()[2:]]
    named = [name.strip("| `").split("` or `")[0] for name, _ in rows]
    assert named == [d.env for d in DECLARED.values()]
    assert dict(zip(named, (shown for _, shown in rows), strict=True))["REPLY_MAX_PARTS"] == "`4`"


@pytest.mark.parametrize("name", [n for n, d in DECLARED.items() if isinstance(Settings.__dataclass_fields__[
    n].default, int | float) and not isinstance(Settings.__dataclass_fields__[n].default, bool)])
def test_every_number_setting_refuses_words_in_one_line_naming_its_variable(name):
    variable = DECLARED[name].env
    with pytest.raises(ConfigError, match=f"^{variable}: expected a (whole )?number, got 'lots'$"):
        Settings.from_env({variable: "lots"})


def test_reply_settings_defaults_and_bounds():
    s = Settings.from_env({})
    assert (s.reply_split, s.reply_max_parts, s.reply_pacing_ms_per_char) == ("paragraphs", 4, 20)
    s = Settings.from_env({"REPLY_SPLIT": "OFF", "REPLY_MAX_PARTS": "20", "REPLY_PACING_MS_PER_CHAR": "0"})
    assert (s.reply_split, s.reply_max_parts, s.reply_pacing_ms_per_char) == ("off", 20, 0)
    for env, line in [({"REPLY_SPLIT": "sentences"},
                       "REPLY_SPLIT: expected paragraphs or off, got 'sentences'"),
                      ({"REPLY_MAX_PARTS": "0"}, "REPLY_MAX_PARTS: must be at least 1, got 0"),
                      ({"REPLY_MAX_PARTS": "21"}, "REPLY_MAX_PARTS: must be at most 20, got 21"),
                      ({"REPLY_PACING_MS_PER_CHAR": "1001"},
                       "REPLY_PACING_MS_PER_CHAR: must be at most 1000, got 1001")]:
        with pytest.raises(ConfigError) as err:
            Settings.from_env(env)
        assert str(err.value) == line


def test_existing_bounds_are_kept():
    assert Settings.from_env({"MAX_BUFFER_SIZE": "1000"}).max_buffer_size == 1000
    for env, line in [({"MAX_BUFFER_SIZE": "1001"}, "MAX_BUFFER_SIZE: must be at most 1000, got 1001"),
                      ({"PROCESSING_LEASE_MS": "2999"},
                       "PROCESSING_LEASE_MS: must be at least 3000, got 2999"),
                      ({"MAX_WEBHOOK_BYTES": "1023"}, "MAX_WEBHOOK_BYTES: must be at least 1024, got 1023"),
                      ({"LLM_TIMEOUT_S": "0"}, "LLM_TIMEOUT_S: must be greater than 0, got 0"),
                      ({"WEBHOOK_TOKEN": "short"}, "WEBHOOK_TOKEN: use at least 16 printable ASCII "
                       "characters without spaces, e.g. the output of `openssl rand -hex 32`"),
                      ({"EVOLUTION_API_URL": "http://evo"}, "EVOLUTION_API_KEY, EVOLUTION_INSTANCE: "
                       "EVOLUTION_API_URL, EVOLUTION_API_KEY and EVOLUTION_INSTANCE are set together "
                       "or not at all"),
                      ({"SYSTEM_PROMPT": "a", "SYSTEM_PROMPT_FILE": "/p"},
                       "SYSTEM_PROMPT_FILE: set either SYSTEM_PROMPT or SYSTEM_PROMPT_FILE, not both")]:
        with pytest.raises(ConfigError) as err:
            Settings.from_env(env)
        assert str(err.value) == line
    s = Settings.from_env({"PROCESSING_LEASE_MS": "3000", "HUMAN_PAUSE_MS": "0", "VISION": "Off",
                           "TRANSCRIPTION_MODEL": "OFF", "MEDIA_ALLOWED_HOSTS": "files.example.com:8443"})
    assert (s.processing_lease_ms, s.human_pause_ms, s.vision, s.transcription) == (3000, 0, False, False)
    assert s.media_allowed_hosts == {"files.example.com:8443"}


# -- settings per inbox ------------------------------------------------------------------------
def _inbox_file(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "inboxes.toml"
    path.write_text(text, encoding="utf-8")
    return {"INBOX_SETTINGS_FILE": str(path)}


def test_without_the_file_every_inbox_has_the_environments_settings():
    s = Settings.from_env({"OPENAI_MODEL": "m"})
    assert s.inboxes == {} and s.for_inbox(3) is s and s.for_inbox(None) is s


def test_an_inbox_table_overrides_only_its_keys_for_that_inbox(tmp_path):
    s = Settings.from_env({"MESSAGE_BUFFER_DURATION_MS": "5000", "HANDOFF_KEYWORDS": "human",
                           **_inbox_file(tmp_path, '''
[inbox.3]
message_buffer_duration_ms = 800
system_prompt = """
Sell things.
"""
vision = false
handoff_keywords = ["Atendênte", "falar com pessoa"]
reply_split = "off"
[inbox.4]
openai_model = "big-model"
handoff_keywords = []
''')})
    three, four = s.for_inbox(3), s.for_inbox(4)
    assert (three.buffer_duration_ms, three.system_prompt, three.vision, three.reply_split) == (
        800, "Sell things.", False, "off")
    assert three.handoff_keywords == ("atendente", "falar com pessoa")
    assert (three.openai_model, three.max_buffer_size) == (s.openai_model, s.max_buffer_size)
    assert (four.openai_model, four.buffer_duration_ms, four.handoff_keywords) == ("big-model", 5000, ())
    assert s.for_inbox(5) is s and s.buffer_duration_ms == 5000 and s.handoff_keywords == ("human",)
    assert three.for_inbox(3) is three  # an inbox's view is final
    dump = s.redacted()["inboxes"]
    assert dump["3"]["system_prompt"] == "<12 chars>" and dump["4"] == {"openai_model": "big-model",
                                                                       "handoff_keywords": ()}


@pytest.mark.parametrize(("toml", "line"), [
    ("[inbox.3]\nmax_size = 5\n",
     "INBOX_SETTINGS_FILE: [inbox.3] max_size: not a setting an inbox can override; those are "),
    ("[inbox.3]\nmax_buffer_size = 5000\n",
     "INBOX_SETTINGS_FILE: [inbox.3] max_buffer_size: must be at most 1000, got 5000"),
    ("[inbox.3]\nmessage_buffer_duration_ms = \"soon\"\n",
     "INBOX_SETTINGS_FILE: [inbox.3] message_buffer_duration_ms: expected a whole number, got 'soon'"),
    ("[inbox.3]\nvision = \"maybe\"\n",
     "INBOX_SETTINGS_FILE: [inbox.3] vision: expected true or false, got 'maybe'"),
    ("[inbox.3]\nreply_split = \"words\"\n",
     "INBOX_SETTINGS_FILE: [inbox.3] reply_split: expected paragraphs or off, got 'words'"),
    ("[inbox.3]\nopenai_model = { name = \"x\" }\n",
     "INBOX_SETTINGS_FILE: [inbox.3] openai_model: expected a string, a number, true or false, or a "
     "list of strings, got dict"),
    ("[inbox.3]\nmessage_buffer_duration_ms = 400000\n",
     "INBOX_SETTINGS_FILE: [inbox.3] max_buffer_age_ms: must be at least message_buffer_duration_ms "
     "(400000), got 300000"),
    ("[inbox.redis_url]\nopenai_model = \"x\"\n",
     "INBOX_SETTINGS_FILE: [inbox.redis_url]: an inbox is named by its Chatwoot id, a whole number"),
    ("[inbox]\nvision = false\n", "INBOX_SETTINGS_FILE: [inbox.vision]: an inbox is named by"),
    ("redis_url = \"redis://elsewhere\"\n",
     "INBOX_SETTINGS_FILE: unexpected 'redis_url'; every setting goes in an [inbox.<id>] table"),
    ("[inbox.3\nvision = false\n", "INBOX_SETTINGS_FILE: '"),
])
def test_a_bad_inbox_file_stops_start_up_with_one_line_naming_inbox_and_key(tmp_path, toml, line):
    with pytest.raises(ConfigError) as err:
        Settings.from_env(_inbox_file(tmp_path, toml))
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_a_missing_inbox_file_is_named():
    with pytest.raises(ConfigError, match=r"^INBOX_SETTINGS_FILE: cannot read '/nonexistent\.toml': "):
        Settings.from_env({"INBOX_SETTINGS_FILE": "/nonexistent.toml"})


def test_the_example_inbox_file_loads_and_shows_every_key_an_inbox_can_set():
    s = Settings.from_env({"INBOX_SETTINGS_FILE": str(EXAMPLE_TOML)})
    assert sorted(s.inboxes) == [3, 7]
    tables = tomllib.loads(EXAMPLE_TOML.read_text(encoding="utf-8"))["inbox"].values()
    assert {key for table in tables for key in table} == set(INBOX_KEYS)
    assert s.for_inbox(3).buffer_duration_ms != s.for_inbox(7).buffer_duration_ms


def test_cli_names_the_inbox_and_key_of_a_bad_inbox_file(tmp_path):
    env = {"PATH": "/usr/bin:/bin", **WORKER_ENV,
           **_inbox_file(tmp_path, "[inbox.12]\nmax_buffer_age_ms = 0\n")}
    proc = subprocess.run([sys.executable, "-m", "buffer_service.cli", "serve"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "buffer-service: configuration error: INBOX_SETTINGS_FILE: [inbox.12] max_buffer_age_ms: "
        "must be at least 1, got 0"]
