"""The LLM client: one chat completion per burst through the official `openai` package.

`OPENAI_BASE_URL` points it at any OpenAI-compatible server. The client library already retries
connection errors, 408/409/429 and 5xx with exponential backoff (`LLM_MAX_RETRIES`), so this
module adds no retry loop of its own; it only sorts the final error into "try the batch again
later" and "trying again cannot help" (a bad key, a model that does not exist).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import httpx2
import openai
import structlog
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from .config import Settings
from .outbound import llm_http_client

log = structlog.get_logger("buffer_service.llm")


class LLMError(Exception):
    def __init__(self, message: str, *, retryable: bool = True,
                 retry_after_s: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.status = status  # the server's HTTP status, when it answered


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text as the model wrote it; not necessarily valid


@dataclass(frozen=True)
class LLMReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    tool_calls: tuple[ToolCall, ...] = ()


class LLMClient:
    def __init__(self, settings: Settings) -> None:
        self.model = settings.openai_model
        # The server turned a request down for its `tools` (a model without tool support):
        # asked without them from then on, for the life of the process.
        self.tools_refused = False
        self._client = openai.AsyncOpenAI(
            # Local OpenAI-compatible servers often need no key, but the client insists on one.
            api_key=settings.openai_api_key or "unused",
            base_url=settings.openai_base_url or None,
            timeout=settings.llm_timeout_s,
            max_retries=settings.llm_max_retries,
            http_client=llm_http_client(settings.llm_timeout_s, settings.worker_concurrency),
        )

    async def warm(self, tools: list[dict[str, Any]] | None = None) -> None:
        """Build now what the client builds on its first call: its chat resources (imported on
        first use), the pydantic models of request and answer and the caches of its parameter
        transform, seconds of CPU on a busy machine (BENCHMARKS.md §8) that a fresh worker's
        first bursts would otherwise wait for. One call through this very client, with its
        settings, whose request is answered in this process by a canned completion: no server
        is asked, nothing is spent. `tools`: those the real calls offer (their transform too)."""
        def answer(request: httpx2.Request) -> httpx2.Response:
            return httpx2.Response(200, json=_WARM_ANSWER, request=request)

        extra: dict[str, Any] = {"tools": tools} if tools else {}
        self._client.chat.completions  # noqa: B018 - the resource is built on first access
        async with httpx2.AsyncClient(transport=httpx2.MockTransport(answer)) as http:
            await self._client.with_options(http_client=http, max_retries=0).chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "warm-up"}], **extra)

    async def reply(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> LLMReply:
        """One chat completion; `tools`: function tools the model may call instead of, or
        besides, answering in text. A server that refuses them (HTTP 400 naming tools: Ollama's
        "does not support tools", vLLM without auto tool choice) is asked once more without,
        as media.py does for images, and not offered them again."""
        if not tools or self.tools_refused:
            return await self._complete(messages, {})
        try:
            return await self._complete(messages, {"tools": tools})
        except LLMError as exc:
            if exc.status != 400 or "tool" not in str(exc).lower():
                raise
            answer = await self._complete(messages, {})
            self.tools_refused = True
            log.warning("llm_tools_refused", error=str(exc))
            return answer

    async def _complete(self, messages: list[dict[str, Any]], extra: dict[str, Any]) -> LLMReply:
        try:
            # The prompt is built as plain JSON objects (processor.build_prompt, media.py); openai's
            # TypedDicts describe the same wire shape, which the server, not the client, checks.
            # `extra` holds `tools` at most, never `stream`: the answer is one ChatCompletion.
            completion: ChatCompletion = await self._client.chat.completions.create(
                model=self.model, messages=cast("list[ChatCompletionMessageParam]", messages), **extra)
        except openai.APIStatusError as exc:
            retryable = exc.status_code == 429 or exc.status_code >= 500 or exc.status_code in (408, 409)
            retry_after = exc.response.headers.get("retry-after")
            raise LLMError(
                f"LLM answered HTTP {exc.status_code}: {_brief(exc)}",
                retryable=retryable,
                retry_after_s=float(retry_after) if retry_after and retry_after.isdigit() else None,
                status=exc.status_code,
            ) from exc
        except openai.APIError as exc:  # connection errors, timeouts, oversized answers
            # "Connection error." alone does not tell an operator that the answer was too large.
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            raise LLMError(f"LLM request failed: {type(exc).__name__}: {_brief(exc)}{cause}") from exc
        except ValueError as exc:  # a 2xx body that is not JSON (a proxy's error page)
            raise LLMError(f"LLM answered with something that is not JSON: {_brief(exc)}") from exc
        # The client does not validate the answer's shape; any other shape is the server's fault.
        try:
            choices = completion.choices or []
            message = choices[0].message if choices else None
            text = (message.content or "").strip() if message else ""
            calls = tuple(ToolCall(c.function.name, c.function.arguments or "")
                          for c in (message.tool_calls or []) if c.type == "function") \
                if message else ()
            usage = completion.usage
            tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        except (AttributeError, TypeError, IndexError, KeyError) as exc:
            raise LLMError(f"LLM answer is not a chat completion: {_brief(exc)}") from exc
        if not text and not calls:
            raise LLMError("LLM returned an empty reply")
        return LLMReply(text, *tokens, tool_calls=calls)

    async def close(self) -> None:
        await self._client.close()


# What LLMClient.warm's in-process answer says: a completion of the shape a server sends.
_WARM_ANSWER = {
    "id": "warm-up", "object": "chat.completion", "created": 0, "model": "warm-up",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "warm-up"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def _brief(exc: Exception) -> str:
    return str(exc)[:300]
