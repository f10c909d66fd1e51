"""Settings: one object, read once from the environment, and per inbox from INBOX_SETTINGS_FILE.

Every setting is declared once, as a field of `Settings`: its variable, default, accepted values
and the line README.md's configuration table gives it (`python -m buffer_service.config` prints
that table; a test keeps README.md equal to it). The variable names are the operators' (several
come from the Supabase design this service replaces), so they are kept exactly. Every problem is
reported as one line naming the variable (or the inbox and key), because that line is often all
an operator sees of a container that will not start.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .keywords import parse_keywords

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful customer-support assistant answering WhatsApp messages. "
    "The customer may have written several short messages in a row: read them all and "
    "answer them together in one short, friendly reply, in the customer's language. "
    "If you cannot help, say that a human agent will follow up."
)

# A shared token is only as strong as its length; `openssl rand -hex 32` gives 64 characters.
_MIN_TOKEN_CHARS = 16
# A burst is moved and read whole inside Lua scripts, whose unpack() takes at most ~8000 values;
# no WhatsApp burst comes near this, and a prompt of more messages would not help anyone.
MAX_BUFFER_SIZE_LIMIT = 1000

_INBOX_FILE = "INBOX_SETTINGS_FILE"
_DECLARATION = "setting"


class ConfigError(ValueError):
    """A setting is missing or invalid; str() is the single line shown to the operator."""


class _Invalid(ValueError):
    """Why a value is refused; the loader puts the variable's (or the inbox key's) name first."""


Parse = Callable[[str], Any]


@dataclass(frozen=True)
class Declaration:
    """How one setting is read and what README.md says of it."""

    env: str
    parse: Parse
    help: str
    shown: str = ""  # the README's default, where the value itself would not say it
    secret: bool = False  # never logged: only whether it is set
    per_inbox: bool = False  # an [inbox.<id>] table may override it, under `key`
    file_variant: bool = False  # <env>_FILE may name a file that holds the value instead

    @property
    def key(self) -> str:
        return self.env.lower()

    def value(self, raw: str, default: Any) -> Any:
        # Empty is the default, as docker compose passes a variable it has no value for.
        return self.parse(raw) if raw else default


def _setting(env: str, default: Any, help: str, parse: Parse | None = None, *, shown: str = "",
             secret: bool = False, per_inbox: bool = False, file_variant: bool = False) -> Any:
    declaration = Declaration(env, parse or _text, help, shown, secret, per_inbox, file_variant)
    return field(default=default, repr=not secret, metadata={_DECLARATION: declaration})


# -- parsers: raw text (stripped, never empty) in, value out, _Invalid for a refused value -----
def _text(raw: str) -> str:
    return raw


def _whole(minimum: int = 1, maximum: int | None = None) -> Parse:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise _Invalid(f"expected a whole number, got {raw!r}") from None
        if value < minimum:
            raise _Invalid(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise _Invalid(f"must be at most {maximum}, got {value}")
        return value
    return parse


def _positive(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _Invalid(f"expected a number, got {raw!r}") from None
    if value <= 0:
        raise _Invalid(f"must be greater than 0, got {raw}")
    return value


def _switch(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise _Invalid(f"expected true or false, got {value!r}")


def _either(words: tuple[str, ...]) -> str:
    return " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)


def _one_of(*choices: str) -> Parse:
    def parse(raw: str) -> str:
        value = raw.lower()
        if value not in choices:
            raise _Invalid(f"expected {_either(choices)}, got {value!r}")
        return value
    return parse


def _some_of(*choices: str) -> Parse:
    def parse(raw: str) -> frozenset[str]:
        values = frozenset(s.strip() for s in raw.split(",") if s.strip())
        if not values or values - set(choices):
            raise _Invalid(f"expected a comma list of {', '.join(choices)}; got {raw!r}")
        return values
    return parse


def _http_url(raw: str) -> str:
    parsed = urlparse(raw)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise _Invalid(f"expected a http/https URL, got {raw!r}")
    return raw.rstrip("/")


def _redis_url(raw: str) -> str:
    # A cluster's seed nodes may be listed, comma-separated (redis_client.py); one is enough.
    for url in raw.split(","):
        if urlparse(url.strip()).scheme not in ("redis", "rediss", "unix"):
            raise _Invalid(f"expected redis://, rediss:// or unix://, got {url.strip()!r}")
    return raw


def _token(raw: str) -> str:
    if len(raw) < _MIN_TOKEN_CHARS or not all("!" <= ch <= "~" for ch in raw):
        # Printable ASCII without spaces: it travels in a header or a URL query and must survive both.
        raise _Invalid(f"use at least {_MIN_TOKEN_CHARS} printable ASCII characters without "
                       "spaces, e.g. the output of `openssl rand -hex 32`")
    return raw


def _key_prefix(raw: str) -> str:
    if not raw.replace("_", "").replace("-", "").isalnum():
        raise _Invalid(f"letters, digits, '-' and '_' only, got {raw!r}")
    return raw


def _model_or_off(raw: str) -> str:
    return "" if raw.lower() == "off" else raw


def host_port(url: str) -> str:
    """`host:port` of an http(s) URL, the port made explicit: what MEDIA_ALLOWED_HOSTS lists."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{(parsed.hostname or '').lower()}:{port}"


def _hosts(raw: str) -> frozenset[str]:
    hosts: set[str] = set()
    for item in (i.strip() for i in raw.split(",")):
        if not item:
            continue
        # A bare host means its usual ports; a URL or host:port names exactly one.
        if "://" in item:
            urls = [item]
        elif ":" in item:
            urls = [f"http://{item}"]
        else:
            urls = [f"http://{item}", f"https://{item}"]
        try:
            named = {host_port(url) for url in urls}
        except ValueError:  # a port that is not a number
            named = {":"}
        if any(h.startswith(":") for h in named):
            raise _Invalid(f"expected host, host:port or a URL, got {item!r}")
        hosts |= named
    return frozenset(hosts)


_STATUSES = ("open", "pending", "resolved", "snoozed")


@dataclass(frozen=True)
class Settings:
    # -- where things are --
    redis_url: str = _setting("REDIS_URL", "redis://127.0.0.1:6379/0",
                              "Redis to use (`rediss://` for TLS); for a Redis Cluster any node, "
                              "or several comma-separated", _redis_url)
    redis_mode: str = _setting(
        "REDIS_MODE", "auto", "`cluster` or `standalone`; `auto` asks the server at start-up "
        "(`INFO cluster`)", _one_of("auto", "standalone", "cluster"))
    redis_wait_replicas: int = _setting(
        "REDIS_WAIT_REPLICAS", 0, "acknowledge a webhook, and post a reply, only once Redis "
        "replicated its write to this many replicas (`WAIT`; docs/cluster.md)", _whole(minimum=0))
    host: str = _setting("HOST", "0.0.0.0", "HTTP listen address")
    port: int = _setting("PORT", 8080, "HTTP listen port", _whole(minimum=0))
    # /metrics of a worker-only process, which has no HTTP server otherwise (0 = none).
    metrics_port: int = _setting(
        "METRICS_PORT", 0, "`/metrics` port of a worker-only process; `PROMETHEUS_MULTIPROC_DIR` "
        "for multiprocess mode", _whole(minimum=0), shown="off")

    # -- the LLM --
    openai_api_key: str = _setting(
        "OPENAI_API_KEY", "", "required for a worker unless `OPENAI_BASE_URL` points at a server "
        "that needs none", secret=True)
    openai_base_url: str = _setting(
        "OPENAI_BASE_URL", "", "any OpenAI-compatible server, e.g. `http://ollama:11434/v1`",
        _http_url, shown="OpenAI")
    openai_model: str = _setting("OPENAI_MODEL", "gpt-4o-mini", "model name", per_inbox=True)
    llm_timeout_s: float = _setting("LLM_TIMEOUT_S", 60.0, "timeout of one LLM request in seconds",
                                    _positive)
    llm_max_retries: int = _setting(
        "LLM_MAX_RETRIES", 2, "how often the `openai` client retries 429/5xx itself, with backoff",
        _whole(minimum=0))
    system_prompt: str = _setting(
        "SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT, "the system prompt, or the file that holds it "
        "(not both)", shown="a short support prompt", per_inbox=True, file_variant=True)

    # -- Chatwoot --
    chatwoot_base_url: str = _setting("CHATWOOT_BASE_URL", "", "required for a worker", _http_url)
    chatwoot_api_token: str = _setting(
        "CHATWOOT_API_TOKEN", "", "required for a worker; sent as `api_access_token`", secret=True)
    chatwoot_account_id: int | None = _setting(
        "CHATWOOT_ACCOUNT_ID", None, "used when a payload carries no `account`", _whole())
    chatwoot_timeout_s: float = _setting(
        "CHATWOOT_TIMEOUT_S", 15.0, "timeout of a call to Chatwoot in seconds; a reply post left "
        "unanswered (or answered `5xx`) is retried no sooner than twice this after it was sent, "
        "asking Chatwoot first", _positive)
    bot_conversation_statuses: frozenset[str] = _setting(
        "BOT_CONVERSATION_STATUSES", frozenset({"pending", "open"}),
        "conversation statuses the bot answers (comma list of open, pending, resolved, snoozed)",
        _some_of(*_STATUSES), shown="`pending,open`")

    # -- who may call the service (docs/security.md); neither secret nor token: webhooks are open --
    chatwoot_webhook_secret: str = _setting(
        "CHATWOOT_WEBHOOK_SECRET", "", "verify Chatwoot's `X-Chatwoot-Signature` (Chatwoot 4.12+); "
        "see [docs/security.md](docs/security.md)", secret=True)
    webhook_token: str = _setting(
        "WEBHOOK_TOKEN", "", "token for older Chatwoot (`?token=`), 16+ printable characters",
        _token, secret=True)
    webhook_max_skew_s: int = _setting("WEBHOOK_MAX_SKEW_S", 300,
                                       "allowed signature clock skew in seconds", _whole())
    admin_token: str = _setting(
        "ADMIN_TOKEN", "", "bearer token of `/admin/*` and `buffer-processor`, and the operator "
        "page's sign-in; unset: they answer 403", _token, secret=True)

    # -- buffering --
    buffer_duration_ms: int = _setting(
        "MESSAGE_BUFFER_DURATION_MS", 30_000,
        "the sliding window: a burst is answered this long after its last message", _whole(),
        per_inbox=True)
    max_buffer_size: int = _setting(
        "MAX_BUFFER_SIZE", 50, "a burst never holds more (at most 1000); the message that fills "
        "it flushes at once", _whole(maximum=MAX_BUFFER_SIZE_LIMIT), per_inbox=True)
    max_buffer_age_ms: int = _setting(
        "MAX_BUFFER_AGE_MS", 300_000, "a burst is flushed this long after its first message at "
        "the latest (at least `MESSAGE_BUFFER_DURATION_MS`)", _whole(), per_inbox=True)
    processing_interval_ms: int = _setting(
        "BUFFER_PROCESSING_INTERVAL_MS", 10_000, "period of the safety sweep that catches a "
        "missed wake-up", _whole())
    # A reply is dropped when newer messages arrived while it was written; old and new are then
    # answered together (up to MAX_BUFFER_AGE_MS after the first message).
    supersede_stale_replies: bool = _setting(
        "SUPERSEDE_STALE_REPLIES", True, "a reply is not posted when new messages arrived "
        "meanwhile; old and new are answered together", _switch)
    # A human agent's message in a conversation keeps the bot quiet this long (0 = never).
    human_pause_ms: int = _setting(
        "HUMAN_PAUSE_MS", 1_800_000, "the bot stays silent this long after a human agent wrote in "
        "the conversation (0 = never)", _whole(minimum=0))

    # -- processing --
    processing_lease_ms: int = _setting(
        "PROCESSING_LEASE_MS", 60_000, "lease of a claimed batch, renewed while it is processed "
        "(at least 3000, so that it can be renewed)", _whole(minimum=3_000))
    max_attempts: int = _setting("MAX_ATTEMPTS", 3, "attempts per batch", _whole())
    retry_base_ms: int = _setting("RETRY_BASE_MS", 2_000,
                                  "base of the exponential backoff between attempts", _whole())
    worker_concurrency: int = _setting("WORKER_CONCURRENCY", 32,
                                       "batches one worker process handles at once", _whole())
    shutdown_grace_s: float = _setting(
        "SHUTDOWN_GRACE_S", 25.0, "how long SIGTERM waits for in-flight batches, in seconds",
        _positive)

    # -- what is kept in Redis --
    history_messages: int = _setting("HISTORY_MESSAGES", 20,
                                     "messages of prompt history per conversation", _whole(minimum=0))
    history_ttl_s: int = _setting("HISTORY_TTL_S", 7 * 86_400,
                                  "how long a conversation's history is kept, in seconds", _whole())
    dedup_ttl_s: int = _setting("DEDUP_TTL_S", 86_400, "how long a delivered message id is "
                                "remembered against duplicates, in seconds", _whole())
    job_retention_days: int = _setting("JOB_RETENTION_DAYS", 30,
                                       "how long completed job records are kept, in days", _whole())
    # The shard count is part of the key layout: every process sharing one Redis must agree.
    shards: int = _setting("BUFFER_SHARDS", 16,
                           "shard count of the key layout (the same for every process)", _whole())
    key_prefix: str = _setting("REDIS_KEY_PREFIX", "bs", "prefix of every key", _key_prefix)
    # Versions before compact buffers read json only: a rolling upgrade from one runs the new
    # version with `json` until no old process is left (README, upgrading).
    buffer_format: str = _setting(
        "BUFFER_FORMAT", "compact", "how buffers and history entries are written: `compact` (JSON "
        "arrays, what a burst's messages share once) or `json` (JSON objects: all that versions "
        "before compact buffers read; see Upgrading); either is read", _one_of("compact", "json"))

    # -- voice notes and images (media.py, transcripts.py, downloads.py) --
    transcription_model: str = _setting(
        "TRANSCRIPTION_MODEL", "gpt-4o-mini-transcribe", "model that transcribes voice notes; "
        "`off` disables transcription ([docs/media.md](docs/media.md))", _model_or_off)
    transcription_base_url: str = _setting(
        "TRANSCRIPTION_BASE_URL", "", "another OpenAI-compatible server for transcription, e.g. a "
        "local Whisper server", _http_url, shown="the chat model's")
    transcription_api_key: str = _setting("TRANSCRIPTION_API_KEY", "", "its API key",
                                          shown="`OPENAI_API_KEY`", secret=True)
    vision: bool = _setting("VISION", True, "images reach the model as images; `off` names them "
                            "in text", _switch, per_inbox=True)
    image_input: str = _setting(
        "IMAGE_INPUT", "inline", "`inline`: images downloaded and sent as data URIs; `url`: the "
        "LLM provider fetches `data_url`", _one_of("inline", "url"))
    # OpenAI's limit for an audio file; a photo from WhatsApp is far smaller.
    max_media_bytes: int = _setting("MAX_MEDIA_BYTES", 25 * 1024 * 1024,
                                    "largest attachment downloaded, in bytes", _whole(minimum=1024))
    max_images_per_burst: int = _setting("MAX_IMAGES_PER_BURST", 8, "images shown per burst (the "
                                         "rest are named)", _whole(minimum=0))
    media_timeout_s: float = _setting(
        "MEDIA_TIMEOUT_S", 60.0, "each download and transcription, and how long a burst waits for "
        "transcripts still running, in seconds", _positive)
    media_allowed_hosts: frozenset[str] = _setting(
        "MEDIA_ALLOWED_HOSTS", frozenset(), "hosts (`host`, `host:port` or URL, comma list) "
        "besides `CHATWOOT_BASE_URL`'s that attachment URLs may name, e.g. Chatwoot's "
        "`FRONTEND_URL`", _hosts)

    # -- what the customer sees while a reply is written (presence.py) --
    typing_indicator: bool = _setting(
        "TYPING_INDICATOR", True, "Chatwoot's typing indicator (`toggle_typing_status`) from the "
        "start of a reply's generation until it is posted, skipped or given up; renewed every "
        "10 s; a failing call never delays the reply; `off` also turns off Evolution's presence "
        "below ([docs/chatwoot.md](docs/chatwoot.md))", _switch, per_inbox=True)
    evolution_api_url: str = _setting(
        "EVOLUTION_API_URL", "", "with `EVOLUTION_API_KEY` and `EVOLUTION_INSTANCE` (all three or "
        "none): WhatsApp's \"typing…\" to the customer through Evolution API's `sendPresence` as "
        "well (an inbox bridged by Evolution)", _http_url)
    evolution_api_key: str = _setting("EVOLUTION_API_KEY", "", "Evolution API's key", secret=True)
    evolution_instance: str = _setting("EVOLUTION_INSTANCE", "", "Evolution API's instance name")

    # -- how a reply is sent --
    reply_split: str = _setting(
        "REPLY_SPLIT", "paragraphs", "`paragraphs`: a reply of several paragraphs goes out as "
        "several WhatsApp messages, in order, each exactly once "
        "([docs/delivery-guarantees.md](docs/delivery-guarantees.md)); `off`: one message",
        _one_of("paragraphs", "off"), per_inbox=True)
    reply_max_parts: int = _setting(
        "REPLY_MAX_PARTS", 4, "most messages a reply is split into (1-20); the rest joins the last "
        "part", _whole(maximum=20))
    reply_pacing_ms_per_char: int = _setting(
        "REPLY_PACING_MS_PER_CHAR", 20, "pause before each further part, per character of it (at "
        "most 4 s; `0`: none), with typing on", _whole(minimum=0, maximum=1000))

    # -- handing a conversation to a human (handoff.py) --
    handoff_keywords: tuple[str, ...] = _setting(
        "HANDOFF_KEYWORDS", (), "comma list of words or phrases (whole words, any case, accents "
        "ignored, e.g. `atendente,humano,human,agent`): a customer message with one hands the "
        "conversation to a human at once, without the LLM ([docs/chatwoot.md](docs/chatwoot.md))",
        parse_keywords, per_inbox=True)
    handoff_message: str = _setting("HANDOFF_MESSAGE", "", "what the bot tells the customer when "
                                    "it hands over; unset: nothing")
    handoff_tool: bool = _setting(
        "HANDOFF_TOOL", True, "the chat request offers the model a `handoff_to_human(reason, "
        "summary)` tool; when it calls it, the conversation is handed to a human (its text, else "
        "`HANDOFF_MESSAGE`, a private note with reason and summary, status `open`)", _switch,
        per_inbox=True)

    # -- hostile input and abuse (docs/security.md); 0 turns a limit off where noted --
    max_webhook_bytes: int = _setting("MAX_WEBHOOK_BYTES", 1024 * 1024,
                                      "largest webhook body in bytes (413 above it)", _whole(minimum=1024))
    max_message_chars: int = _setting("MAX_MESSAGE_CHARS", 4000,
                                      "longer message text is truncated and marked", _whole(minimum=100))
    max_buffer_bytes: int = _setting("MAX_BUFFER_BYTES", 1024 * 1024, "a buffer holding this many "
                                     "bytes ignores further messages (0 = off)", _whole(minimum=0))
    # A burst of up to N accepted messages, refilled at N per window: a WhatsApp album of 30
    # photos arrives as 30 webhooks at once and must pass.
    rate_limit_per_conversation: int = _setting(
        "RATE_LIMIT_PER_CONVERSATION", 120, "accepted messages per conversation per window, "
        "shared by all replicas (0 = off)", _whole(minimum=0))
    rate_limit_global: int = _setting(
        "RATE_LIMIT_GLOBAL", 0, "accepted messages of all conversations together per window "
        "(0 = off)", _whole(minimum=0), shown="off")
    rate_limit_window_s: int = _setting("RATE_LIMIT_WINDOW_S", 60,
                                        "the rate limits' window, in seconds", _whole())
    max_llm_calls_per_conversation_per_hour: int = _setting(
        "MAX_LLM_CALLS_PER_CONVERSATION_PER_HOUR", 0, "LLM spend guard (0 = off)",
        _whole(minimum=0), shown="off")

    # -- logs --
    log_format: str = _setting("LOG_FORMAT", "json",
                               "`json` for log collectors, `console` for a human-readable view",
                               _one_of("json", "console"))
    log_level: str = _setting("LOG_LEVEL", "info", "debug, info, warning or error",
                              _one_of("debug", "info", "warning", "error"))

    # -- the process --
    event_loop: str = _setting(
        "EVENT_LOOP", "auto", "`uvloop` (C event loop: a webhook costs less CPU), `asyncio` (the "
        "standard library's), or `auto`: uvloop where it is installed", _one_of("auto", "uvloop", "asyncio"))

    # -- per inbox --
    inbox_settings_file: str = _setting(
        _INBOX_FILE, "", "a TOML file whose `[inbox.<id>]` tables override the settings marked "
        "per inbox for one Chatwoot inbox ([Settings per inbox](#settings-per-inbox)); read at "
        "start-up")
    # INBOX_SETTINGS_FILE's inboxes, each with its overrides applied (for_inbox).
    inboxes: Mapping[int, Settings] = field(default_factory=dict, repr=False, hash=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, declared in DECLARED.items():
            raw = env.get(declared.env, "").strip()
            if declared.file_variant:
                raw = _from_file(declared.env, raw, env)
            try:
                values[name] = declared.value(raw, SETTINGS_DEFAULTS[name])
            except _Invalid as exc:
                raise ConfigError(f"{declared.env}: {exc}") from None
        settings = cls(**values)
        _check_age(settings, "", lambda attr: DECLARED[attr].env)
        evolution = {d.env: getattr(settings, name) for name, d in DECLARED.items()
                     if d.env.startswith("EVOLUTION_")}
        # Half of them set is a typo, not a choice: say so rather than silently send no presence.
        if any(evolution.values()) and not all(evolution.values()):
            missing = ", ".join(k for k, v in evolution.items() if not v)
            raise ConfigError(f"{missing}: EVOLUTION_API_URL, EVOLUTION_API_KEY and "
                              "EVOLUTION_INSTANCE are set together or not at all")
        if settings.inbox_settings_file:
            settings = settings.with_inbox_file(settings.inbox_settings_file)
        return settings

    def with_inbox_file(self, path: str) -> Settings:
        """These settings with the overrides of an INBOX_SETTINGS_FILE, checked by the same
        declarations as the environment. Read once: a changed file takes a restart. Each inbox
        copies these settings as they are now, so a test's `replace()` comes before this."""
        return dataclasses.replace(self, inbox_settings_file=path,
                                   inboxes=_inbox_settings(dataclasses.replace(self, inboxes={}), path))

    def for_inbox(self, inbox_id: int | None) -> Settings:
        """The settings of a conversation in this Chatwoot inbox: its [inbox.<id>] table of
        INBOX_SETTINGS_FILE over the environment's; the environment's for any other inbox."""
        return self if inbox_id is None else self.inboxes.get(inbox_id, self)

    @property
    def transcription(self) -> bool:
        return bool(self.transcription_model)

    def require_worker(self) -> None:
        """A worker talks to the LLM and to Chatwoot; the HTTP side alone needs neither."""
        if not self.openai_api_key and not self.openai_base_url:
            raise ConfigError(
                "OPENAI_API_KEY: required to run a worker (or set OPENAI_BASE_URL for a "
                "local OpenAI-compatible server that needs no key)"
            )
        if not self.chatwoot_base_url:
            raise ConfigError("CHATWOOT_BASE_URL: required to run a worker, e.g. https://chatwoot.example.com")
        if not self.chatwoot_api_token:
            raise ConfigError("CHATWOOT_API_TOKEN: required to run a worker (agent bot or user access token)")

    def redacted(self) -> dict[str, object]:
        """The settings as a dict safe to log: secrets show only whether they are set; each
        inbox of INBOX_SETTINGS_FILE shows what it overrides."""
        out = {name: _redact(name, getattr(self, name)) for name in DECLARED}
        if self.inboxes:
            out["inboxes"] = {
                str(inbox): {DECLARED[name].key: _redact(name, getattr(own, name))
                             for name in INBOX_KEYS.values() if getattr(own, name) != getattr(self, name)}
                for inbox, own in self.inboxes.items()}
        return out


DECLARED: dict[str, Declaration] = {
    f.name: f.metadata[_DECLARATION] for f in dataclasses.fields(Settings) if _DECLARATION in f.metadata}
SETTINGS_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Settings)
                                     if f.name in DECLARED}
# Names whose values must never reach a log line or a config dump.
SECRET_FIELDS = frozenset(name for name, d in DECLARED.items() if d.secret)
# What an [inbox.<id>] table may set: key (the variable in lower case) -> Settings attribute.
INBOX_KEYS = {d.key: name for name, d in DECLARED.items() if d.per_inbox}


def _from_file(name: str, raw: str, env: Mapping[str, str]) -> str:
    variable = f"{name}_FILE"
    path = env.get(variable, "").strip()
    if not path:
        return raw
    if raw:
        raise ConfigError(f"{variable}: set either {name} or {variable}, not both")
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path!r}: {exc.strerror}") from None
    if not text:
        raise ConfigError(f"{variable}: {path!r} is empty")
    return text


def _check_age(s: Settings, where: str, name: Callable[[str], str]) -> None:
    if s.max_buffer_age_ms < s.buffer_duration_ms:
        raise ConfigError(f"{where}{name('max_buffer_age_ms')}: must be at least "
                          f"{name('buffer_duration_ms')} ({s.buffer_duration_ms}), got {s.max_buffer_age_ms}")


def _as_text(value: object) -> str:
    """A TOML value as the environment would spell it, so that one parser checks both."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, str | int | float):
        return str(value).strip()
    raise _Invalid(f"expected a string, a number, true or false, or a list of strings, "
                   f"got {type(value).__name__}")


def _inbox_settings(base: Settings, path: str) -> dict[int, Settings]:
    """INBOX_SETTINGS_FILE's [inbox.<id>] tables, each as `base` with its overrides."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{_INBOX_FILE}: cannot read {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{_INBOX_FILE}: {path!r} is not valid TOML: {reason}") from None
    tables = data.get("inbox", {})
    if set(data) - {"inbox"} or not isinstance(tables, dict):
        other = next(iter(sorted(set(data) - {"inbox"})), "inbox")
        raise ConfigError(f"{_INBOX_FILE}: unexpected {other!r}; every setting goes in an "
                          "[inbox.<id>] table")
    inboxes: dict[int, Settings] = {}
    for inbox, table in tables.items():
        where = f"{_INBOX_FILE}: [inbox.{inbox}]"
        if not inbox.isdigit() or int(inbox) < 1:
            raise ConfigError(f"{where}: an inbox is named by its Chatwoot id, a whole number")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table of settings")
        overrides: dict[str, Any] = {}
        for key, value in table.items():
            name = INBOX_KEYS.get(key)
            if name is None:
                raise ConfigError(f"{where} {key}: not a setting an inbox can override; those are "
                                  f"{', '.join(INBOX_KEYS)}")
            try:
                overrides[name] = DECLARED[name].value(_as_text(value), SETTINGS_DEFAULTS[name])
            except _Invalid as exc:
                raise ConfigError(f"{where} {key}: {exc}") from None
        own = dataclasses.replace(base, **overrides)
        _check_age(own, f"{where} ", lambda attr: DECLARED[attr].key)
        inboxes[int(inbox)] = own
    return inboxes


def _hide_password(url: str) -> str:
    # Managed Redis puts its password in REDIS_URL (redis://:password@host): the start-up line
    # that dumps the settings must not carry it.
    password = urlparse(url).password
    return url.replace(f":{password}@", ":<set>@", 1) if password else url


def _redact(name: str, value: Any) -> object:
    if name in SECRET_FIELDS:
        return "<set>" if value else "<unset>"
    if name == "system_prompt":
        return f"<{len(value)} chars>"
    if name.endswith("_url"):
        return _hide_password(value)
    if isinstance(value, frozenset):
        return sorted(value)
    return value


def _shown(name: str) -> str:
    declared, default = DECLARED[name], SETTINGS_DEFAULTS[name]
    if declared.shown:
        return declared.shown
    if isinstance(default, bool):
        return "`on`" if default else "`off`"
    if default is None or (isinstance(default, str | tuple | frozenset) and not default):
        return "—"
    return f"`{default:g}`" if isinstance(default, float) else f"`{default}`"


def markdown_table() -> str:
    """README.md's configuration table: every setting, its default and what it does."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, declared in DECLARED.items():
        variable = f"`{declared.env}`" + (f" or `{declared.env}_FILE`" if declared.file_variant else "")
        per_inbox = " (per inbox)" if declared.per_inbox else ""
        rows.append(f"| {variable} | {_shown(name)} | {declared.help}{per_inbox} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
