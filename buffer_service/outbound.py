"""Bounds on what a call to the LLM may cost us: time in total, and bytes of its answer.

The openai client's `timeout` bounds each step (connect, each read), not the whole call: a
server that sends a byte every few seconds keeps a batch busy for as long as it likes, and the
client reads any answer whole into memory, 10 MB or 1 GB. This transport, under the client's
own, ends an attempt after `total_s` and after `max_bytes` of body, with the httpx errors the
client already knows (a timeout, a read error), so its bounded retries and the batch's retry
handle them like any other failure. Compression is declined so that `max_bytes` bounds what
is decoded, not just what travels.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx2

# A chat completion is a few KB; a reply long enough to need more is not a WhatsApp message.
LLM_MAX_RESPONSE_BYTES = 1024 * 1024


class _CappedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, request: httpx2.Request, max_bytes: int,
                 deadline: float) -> None:
        self._inner = inner
        self._request = request
        self._max_bytes = max_bytes
        self._deadline = deadline

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = aiter(self._inner)
        size = 0
        while True:
            try:
                # Each read alone under the deadline: a timeout scope around the whole loop
                # would cancel the consumer while this generator waits at its `yield`.
                async with asyncio.timeout_at(self._deadline):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise httpx2.ReadTimeout("the whole response took longer than the total timeout",
                                         request=self._request) from None
            size += len(chunk)
            if size > self._max_bytes:
                raise httpx2.ReadError(f"response larger than {self._max_bytes} bytes",
                                       request=self._request)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class BoundedTransport(httpx2.AsyncBaseTransport):
    """Wraps a transport: each request ends within `total_s` and reads at most `max_bytes`."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, *, total_s: float, max_bytes: int) -> None:
        self._inner = inner
        self._total_s = total_s
        self._max_bytes = max_bytes

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        deadline = asyncio.get_running_loop().time() + self._total_s
        request.headers["Accept-Encoding"] = "identity"
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._inner.handle_async_request(request)
        except TimeoutError:
            raise httpx2.ReadTimeout("no response within the total timeout", request=request) from None
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self._max_bytes:
            await response.aclose()
            raise httpx2.ReadError(f"response of {length} bytes is larger than {self._max_bytes}",
                                   request=request)
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        return httpx2.Response(
            status_code=response.status_code, headers=response.headers, request=request,
            stream=_CappedStream(response.stream, request, self._max_bytes, deadline),
            extensions=response.extensions)

    async def aclose(self) -> None:
        await self._inner.aclose()


def llm_http_client(timeout_s: float, concurrency: int) -> httpx2.AsyncClient:
    """The HTTP client for `openai.AsyncOpenAI`: per-step and total timeouts, capped answers."""
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transport = BoundedTransport(httpx2.AsyncHTTPTransport(limits=limits), total_s=timeout_s,
                                 max_bytes=LLM_MAX_RESPONSE_BYTES)
    # Redirects followed as the openai client's own default client does.
    return httpx2.AsyncClient(transport=transport, timeout=timeout_s, follow_redirects=True)
