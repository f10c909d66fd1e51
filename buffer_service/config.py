"""Settings: one object, read once from the environment.

The variable names are the operators' (several come from the Supabase design this service
replaces), so they are kept exactly. Every problem is reported as one line naming the
variable, because that line is often all an operator sees of a container that will not start.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .keywords import parse_keywords

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful customer-support assistant answering WhatsApp messages. "
    "The customer may have written several short messages in a row: read them all and "
    "answer them together in one short, friendly reply, in the customer's language. "
    "If you cannot help, say that a human agent will follow up."
)

# Names whose values must never reach a log line or a config dump.
SECRET_FIELDS = frozenset({"openai_api_key", "chatwoot_api_token", "chatwoot_webhook_secret",
                           "webhook_token", "admin_token", "transcription_api_key",
                           "evolution_api_key"})
# A shared token is only as strong as its length; `openssl rand -hex 32` gives 64 characters.
_MIN_TOKEN_CHARS = 16


# A burst is moved and read whole inside Lua scripts, whose unpack() takes at most ~8000 values;
# no WhatsApp burst comes near this, and a prompt of more messages would not help anyone.
MAX_BUFFER_SIZE_LIMIT = 1000


class ConfigError(ValueError):
    """A setting is missing or invalid; str() is the single line shown to the operator."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1,
         maximum: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}: must be at most {maximum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name}: must be greater than 0, got {raw}")
    return value


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip()
    if not raw:
        return ""
    parsed = urlparse(raw)
    if parsed.scheme not in schemes or not parsed.netloc:
        raise ConfigError(f"{name}: expected a {'/'.join(schemes)} URL, got {raw!r}")
    return raw.rstrip("/")


def _token(env: Mapping[str, str], name: str) -> str:
    raw = env.get(name, "").strip()
    if raw and (len(raw) < _MIN_TOKEN_CHARS or not all("!" <= ch <= "~" for ch in raw)):
        # Printable ASCII without spaces: it travels in a header or a URL query and must survive both.
        raise ConfigError(f"{name}: use at least {_MIN_TOKEN_CHARS} printable ASCII characters without "
                          "spaces, e.g. the output of `openssl rand -hex 32`")
    return raw


def _hide_password(url: str) -> str:
    # Managed Redis puts its password in REDIS_URL (redis://:password@host): the start-up line
    # that dumps the settings must not carry it.
    password = urlparse(url).password
    return url.replace(f":{password}@", ":<set>@", 1) if password else url


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "0.0.0.0"
    port: int = 8080

    openai_api_key: str = field(default="", repr=False)
    openai_base_url: str = ""
    openai_model: str = "gpt-4o-mini"
    llm_timeout_s: float = 60.0
    llm_max_retries: int = 2
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    chatwoot_base_url: str = ""
    chatwoot_api_token: str = field(default="", repr=False)
    chatwoot_account_id: int | None = None
    chatwoot_timeout_s: float = 15.0

    buffer_duration_ms: int = 30_000
    processing_interval_ms: int = 10_000
    max_buffer_size: int = 50
    max_buffer_age_ms: int = 300_000
    bot_conversation_statuses: frozenset[str] = frozenset({"pending", "open"})

    # The shard count is part of the key layout: every process sharing one Redis must agree.
    shards: int = 16
    key_prefix: str = "bs"
    processing_lease_ms: int = 60_000
    max_attempts: int = 3
    # A reply is dropped when newer messages arrived while it was written; old and new are then
    # answered together (up to MAX_BUFFER_AGE_MS after the first message).
    supersede_stale_replies: bool = True
    # A human agent's message in a conversation keeps the bot quiet this long (0 = never).
    human_pause_ms: int = 1_800_000
    retry_base_ms: int = 2_000
    worker_concurrency: int = 32
    history_messages: int = 20
    history_ttl_s: int = 7 * 86_400
    dedup_ttl_s: int = 86_400
    job_retention_days: int = 30
    shutdown_grace_s: float = 25.0

    log_format: str = "json"
    log_level: str = "info"
    # /metrics of a worker-only process, which has no HTTP server otherwise (0 = none).
    metrics_port: int = 0

    # Who may call us (docs/security.md). Neither webhook secret nor token: webhooks are open.
    chatwoot_webhook_secret: str = field(default="", repr=False)
    webhook_token: str = field(default="", repr=False)
    webhook_max_skew_s: int = 300
    admin_token: str = field(default="", repr=False)
    # Hostile input and abuse; 0 turns a limit off where noted.
    max_webhook_bytes: int = 1024 * 1024
    max_message_chars: int = 4000
    max_buffer_bytes: int = 1024 * 1024  # 0 = off
    # A burst of up to N accepted messages, refilled at N per window: a WhatsApp album of 30
    # photos arrives as 30 webhooks at once and must pass.
    rate_limit_per_conversation: int = 120  # 0 = off
    rate_limit_global: int = 0  # 0 = off
    rate_limit_window_s: int = 60
    max_llm_calls_per_conversation_per_hour: int = 0  # 0 = off

    # Voice notes and images (media.py, transcripts.py, downloads.py). "" = transcription off.
    transcription_model: str = "gpt-4o-mini-transcribe"
    transcription_base_url: str = ""  # "" = the chat model's OPENAI_BASE_URL
    transcription_api_key: str = field(default="", repr=False)  # "" = OPENAI_API_KEY
    vision: bool = True
    image_input: str = "inline"  # or "url": the model fetches data_url itself
    # OpenAI's limit for an audio file; a photo from WhatsApp is far smaller.
    max_media_bytes: int = 25 * 1024 * 1024
    max_images_per_burst: int = 8
    media_timeout_s: float = 60.0
    # host:port pairs besides CHATWOOT_BASE_URL's that attachment URLs may name (downloads.py).
    media_allowed_hosts: frozenset[str] = frozenset()

    # What the customer sees while a reply is written (presence.py): Chatwoot's typing
    # indicator, and WhatsApp's "typing…" through Evolution API when all three are set.
    typing_indicator: bool = True
    evolution_api_url: str = ""
    evolution_api_key: str = field(default="", repr=False)
    evolution_instance: str = ""

    # Handing a conversation to a human (handoff.py): customer words that ask for one (folded:
    # lower case, no accents), and what the bot says then ("" = nothing).
    handoff_keywords: tuple[str, ...] = ()
    handoff_message: str = ""
    # The model may hand over with the `handoff_to_human` tool.
    handoff_tool: bool = True

    # A reply of several paragraphs goes out as several messages (parts.py):
    # "paragraphs" or "off", at most this many parts, a pause of this many ms per character of
    # the next part before it (0: none; at most 4 s).
    reply_split: str = "paragraphs"
    reply_max_parts: int = 4
    reply_pacing_ms_per_char: int = 20

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        redis_url = env.get("REDIS_URL", "").strip() or cls.redis_url
        if urlparse(redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"REDIS_URL: expected redis://, rediss:// or unix://, got {redis_url!r}")

        prompt = env.get("SYSTEM_PROMPT", "").strip()
        prompt_file = env.get("SYSTEM_PROMPT_FILE", "").strip()
        if prompt and prompt_file:
            raise ConfigError("SYSTEM_PROMPT_FILE: set either SYSTEM_PROMPT or SYSTEM_PROMPT_FILE, not both")
        if prompt_file:
            try:
                prompt = Path(prompt_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"SYSTEM_PROMPT_FILE: cannot read {prompt_file!r}: {exc.strerror}") from None
            if not prompt:
                raise ConfigError(f"SYSTEM_PROMPT_FILE: {prompt_file!r} is empty")

        account_raw = env.get("CHATWOOT_ACCOUNT_ID", "").strip()
        account_id = _int(env, "CHATWOOT_ACCOUNT_ID", 0) if account_raw else None

        statuses = frozenset(
            s.strip() for s in env.get("BOT_CONVERSATION_STATUSES", "pending,open").split(",") if s.strip()
        )
        unknown = statuses - {"open", "pending", "resolved", "snoozed"}
        if not statuses or unknown:
            raise ConfigError(
                "BOT_CONVERSATION_STATUSES: expected a comma list of open, pending, resolved, snoozed; "
                f"got {env.get('BOT_CONVERSATION_STATUSES')!r}"
            )

        log_format = env.get("LOG_FORMAT", "json").strip().lower() or "json"
        if log_format not in ("json", "console"):
            raise ConfigError(f"LOG_FORMAT: expected json or console, got {log_format!r}")
        log_level = env.get("LOG_LEVEL", "info").strip().lower() or "info"
        if log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"LOG_LEVEL: expected debug, info, warning or error, got {log_level!r}")

        prefix = env.get("REDIS_KEY_PREFIX", "bs").strip() or "bs"
        if not prefix.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"REDIS_KEY_PREFIX: letters, digits, '-' and '_' only, got {prefix!r}")

        settings = cls(
            redis_url=redis_url,
            host=env.get("HOST", "").strip() or cls.host,
            port=_int(env, "PORT", cls.port, minimum=0),
            openai_api_key=env.get("OPENAI_API_KEY", "").strip(),
            openai_base_url=_url(env, "OPENAI_BASE_URL", ("http", "https")),
            openai_model=env.get("OPENAI_MODEL", "").strip() or cls.openai_model,
            llm_timeout_s=_float(env, "LLM_TIMEOUT_S", cls.llm_timeout_s),
            llm_max_retries=_int(env, "LLM_MAX_RETRIES", cls.llm_max_retries, minimum=0),
            system_prompt=prompt or DEFAULT_SYSTEM_PROMPT,
            chatwoot_base_url=_url(env, "CHATWOOT_BASE_URL", ("http", "https")),
            chatwoot_api_token=env.get("CHATWOOT_API_TOKEN", "").strip(),
            chatwoot_account_id=account_id,
            chatwoot_timeout_s=_float(env, "CHATWOOT_TIMEOUT_S", cls.chatwoot_timeout_s),
            buffer_duration_ms=_int(env, "MESSAGE_BUFFER_DURATION_MS", cls.buffer_duration_ms),
            processing_interval_ms=_int(env, "BUFFER_PROCESSING_INTERVAL_MS",
                                        cls.processing_interval_ms),
            max_buffer_size=_int(env, "MAX_BUFFER_SIZE", cls.max_buffer_size,
                                 maximum=MAX_BUFFER_SIZE_LIMIT),
            max_buffer_age_ms=_int(env, "MAX_BUFFER_AGE_MS", cls.max_buffer_age_ms),
            bot_conversation_statuses=statuses,
            shards=_int(env, "BUFFER_SHARDS", cls.shards),
            key_prefix=prefix,
            processing_lease_ms=_int(env, "PROCESSING_LEASE_MS", cls.processing_lease_ms),
            max_attempts=_int(env, "MAX_ATTEMPTS", cls.max_attempts),
            supersede_stale_replies=_bool(env, "SUPERSEDE_STALE_REPLIES", cls.supersede_stale_replies),
            human_pause_ms=_int(env, "HUMAN_PAUSE_MS", cls.human_pause_ms, minimum=0),
            retry_base_ms=_int(env, "RETRY_BASE_MS", cls.retry_base_ms),
            worker_concurrency=_int(env, "WORKER_CONCURRENCY", cls.worker_concurrency),
            history_messages=_int(env, "HISTORY_MESSAGES", cls.history_messages, minimum=0),
            history_ttl_s=_int(env, "HISTORY_TTL_S", cls.history_ttl_s),
            dedup_ttl_s=_int(env, "DEDUP_TTL_S", cls.dedup_ttl_s),
            job_retention_days=_int(env, "JOB_RETENTION_DAYS", cls.job_retention_days),
            shutdown_grace_s=_float(env, "SHUTDOWN_GRACE_S", cls.shutdown_grace_s),
            log_format=log_format,
            log_level=log_level,
            metrics_port=_int(env, "METRICS_PORT", cls.metrics_port, minimum=0),
            chatwoot_webhook_secret=env.get("CHATWOOT_WEBHOOK_SECRET", "").strip(),
            webhook_token=_token(env, "WEBHOOK_TOKEN"),
            webhook_max_skew_s=_int(env, "WEBHOOK_MAX_SKEW_S", cls.webhook_max_skew_s),
            admin_token=_token(env, "ADMIN_TOKEN"),
            max_webhook_bytes=_int(env, "MAX_WEBHOOK_BYTES", cls.max_webhook_bytes, minimum=1024),
            max_message_chars=_int(env, "MAX_MESSAGE_CHARS", cls.max_message_chars, minimum=100),
            max_buffer_bytes=_int(env, "MAX_BUFFER_BYTES", cls.max_buffer_bytes, minimum=0),
            rate_limit_per_conversation=_int(env, "RATE_LIMIT_PER_CONVERSATION",
                                             cls.rate_limit_per_conversation, minimum=0),
            rate_limit_global=_int(env, "RATE_LIMIT_GLOBAL", cls.rate_limit_global, minimum=0),
            rate_limit_window_s=_int(env, "RATE_LIMIT_WINDOW_S", cls.rate_limit_window_s),
            max_llm_calls_per_conversation_per_hour=_int(
                env, "MAX_LLM_CALLS_PER_CONVERSATION_PER_HOUR",
                cls.max_llm_calls_per_conversation_per_hour, minimum=0),
            **_media_settings(env),
            **_presence_settings(env),
            **_reply_settings(env),
        )
        if settings.max_buffer_age_ms < settings.buffer_duration_ms:
            raise ConfigError(
                f"MAX_BUFFER_AGE_MS: must be at least MESSAGE_BUFFER_DURATION_MS "
                f"({settings.buffer_duration_ms}), got {settings.max_buffer_age_ms}"
            )
        if settings.processing_lease_ms < 3_000:
            raise ConfigError("PROCESSING_LEASE_MS: must be at least 3000 so a lease can be renewed")
        return settings

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
        """The settings as a dict safe to log: secrets show only whether they are set."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS:
                value = "<set>" if value else "<unset>"
            elif f.name == "system_prompt":
                value = f"<{len(value)} chars>"
            elif f.name.endswith("_url"):
                value = _hide_password(value)
            elif isinstance(value, frozenset):
                value = sorted(value)
            out[f.name] = value
        return out


def host_port(url: str) -> str:
    """`host:port` of an http(s) URL, the port made explicit: what MEDIA_ALLOWED_HOSTS lists."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{(parsed.hostname or '').lower()}:{port}"


def _allowed_hosts(env: Mapping[str, str]) -> frozenset[str]:
    hosts: set[str] = set()
    for item in env.get("MEDIA_ALLOWED_HOSTS", "").split(","):
        item = item.strip()
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
            raise ConfigError(f"MEDIA_ALLOWED_HOSTS: expected host, host:port or a URL, got {item!r}")
        hosts |= named
    return frozenset(hosts)


def _media_settings(env: Mapping[str, str]) -> dict[str, object]:
    model = env.get("TRANSCRIPTION_MODEL", "").strip() or Settings.transcription_model
    image_input = env.get("IMAGE_INPUT", "").strip().lower() or Settings.image_input
    if image_input not in ("inline", "url"):
        raise ConfigError(f"IMAGE_INPUT: expected inline or url, got {image_input!r}")
    return {
        "transcription_model": "" if model.lower() == "off" else model,
        "transcription_base_url": _url(env, "TRANSCRIPTION_BASE_URL", ("http", "https")),
        "transcription_api_key": env.get("TRANSCRIPTION_API_KEY", "").strip(),
        "vision": _bool(env, "VISION", Settings.vision),
        "image_input": image_input,
        "max_media_bytes": _int(env, "MAX_MEDIA_BYTES", Settings.max_media_bytes, minimum=1024),
        "max_images_per_burst": _int(env, "MAX_IMAGES_PER_BURST", Settings.max_images_per_burst,
                                     minimum=0),
        "media_timeout_s": _float(env, "MEDIA_TIMEOUT_S", Settings.media_timeout_s),
        "media_allowed_hosts": _allowed_hosts(env),
    }


def _presence_settings(env: Mapping[str, str]) -> dict[str, object]:
    evolution = {
        "evolution_api_url": _url(env, "EVOLUTION_API_URL", ("http", "https")),
        "evolution_api_key": env.get("EVOLUTION_API_KEY", "").strip(),
        "evolution_instance": env.get("EVOLUTION_INSTANCE", "").strip(),
    }
    # Half of them set is a typo, not a choice: say so rather than silently send no presence.
    if any(evolution.values()) and not all(evolution.values()):
        missing = ", ".join(k.upper() for k, v in evolution.items() if not v)
        raise ConfigError(f"{missing}: EVOLUTION_API_URL, EVOLUTION_API_KEY and "
                          "EVOLUTION_INSTANCE are set together or not at all")
    return {"typing_indicator": _bool(env, "TYPING_INDICATOR", Settings.typing_indicator),
            **evolution,
            "handoff_keywords": parse_keywords(env.get("HANDOFF_KEYWORDS", "")),
            "handoff_message": env.get("HANDOFF_MESSAGE", "").strip(),
            "handoff_tool": _bool(env, "HANDOFF_TOOL", Settings.handoff_tool)}


def _reply_settings(env: Mapping[str, str]) -> dict[str, object]:
    split = env.get("REPLY_SPLIT", "").strip().lower() or Settings.reply_split
    if split not in ("paragraphs", "off"):
        raise ConfigError(f"REPLY_SPLIT: expected paragraphs or off, got {split!r}")
    return {"reply_split": split,
            "reply_max_parts": _int(env, "REPLY_MAX_PARTS", Settings.reply_max_parts, maximum=20),
            "reply_pacing_ms_per_char": _int(env, "REPLY_PACING_MS_PER_CHAR",
                                             Settings.reply_pacing_ms_per_char, minimum=0,
                                             maximum=1000)}
