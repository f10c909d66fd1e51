"""Downloads of attachment files, safe against server-side request forgery.

An attachment's `data_url` comes from the webhook payload, which anyone can forge where no
webhook signature or token is configured (docs/security.md). Fetching whatever URL a payload
names would let a stranger make this service read its own network: Redis, the cloud metadata
service, an admin page on localhost. So:

- The first URL must be http(s) on an **allowed** host and port: the one of
  `CHATWOOT_BASE_URL`, or one listed in `MEDIA_ALLOWED_HOSTS` (Chatwoot's `FRONTEND_URL`, which
  its `data_url`s name, may differ from the API address the service uses).
- Redirects are followed by hand, at most `_MAX_REDIRECTS`: ActiveStorage answers `data_url`
  with a redirect to the storage (Chatwoot's disk service on the same host, or S3/GCS). Each
  hop may go to an allowed host, or to a **public** address only: the connection's resolver
  (`_GuardedResolver`) refuses a host whose DNS answer holds a loopback, private, link-local
  (metadata), shared or reserved address, and the connection is made to exactly the addresses
  it checked, so a DNS answer that changes between check and connect (rebinding) cannot slip
  through. IP literals, which aiohttp never resolves, are checked before the request.
- The Chatwoot token is sent only to CHATWOOT_BASE_URL's own scheme, host and port, never to a
  hop elsewhere (ActiveStorage URLs are signed and need none; it is sent to Chatwoot itself for
  installations that put their storage behind the API's authentication). No cookies are kept.
- Each download is capped at `MAX_MEDIA_BYTES` (from Content-Length before reading, and while
  reading) and bounded by `MEDIA_TIMEOUT_S` in total.

A refused or failed download raises `DownloadError`, whose `reason` is a short fixed label for
metrics and whose text says what happened without the URL's signed token.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlparse

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from .config import Settings, host_port

_MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CONNECT_TIMEOUT_S = 10.0


class DownloadError(Exception):
    def __init__(self, reason: str, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.reason = reason  # refused | too_large | http_error | timeout | failed
        self.transient = transient  # trying again later may succeed


@dataclass(frozen=True)
class Download:
    data: bytes
    content_type: str


def is_public(address: str) -> bool:
    """An address on the internet: not loopback, private, link-local (cloud metadata), shared
    (carrier NAT), multicast, reserved or unspecified; IPv4 inside IPv6 is judged as IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _shown(url: str) -> str:
    """A URL for logs and job records: ActiveStorage's signed ids are capabilities; cut them."""
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.netloc}{parsed.path[:40]}{'...' if len(parsed.path) > 40 else ''}"


class _RefusedAddress(OSError):
    """A host that resolves to a non-public address and is not allowed by name."""


class _GuardedResolver(AbstractResolver):
    """Resolves allowed hosts as usual and every other host to public addresses only."""

    def __init__(self, allowed: frozenset[str]) -> None:
        self._allowed = allowed
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        if f"{host.lower()}:{port}" in self._allowed:
            return answers
        blocked = [a["host"] for a in answers if not is_public(a["host"])]
        if blocked:
            raise _RefusedAddress(f"a redirect to {host}, which resolves to the non-public "
                                  f"address {blocked[0]}")
        return answers

    async def close(self) -> None:
        await self._inner.close()


class Downloader:
    def __init__(self, settings: Settings) -> None:
        self._chatwoot = ""
        if settings.chatwoot_base_url:
            parsed = urlparse(settings.chatwoot_base_url)
            self._chatwoot = f"{parsed.scheme}://{host_port(settings.chatwoot_base_url)}"
        self._allowed = settings.media_allowed_hosts | (
            {host_port(settings.chatwoot_base_url)} if settings.chatwoot_base_url else set())
        self._token = settings.chatwoot_api_token
        self.max_bytes = settings.max_media_bytes
        self._timeout = aiohttp.ClientTimeout(total=settings.media_timeout_s,
                                              connect=min(_CONNECT_TIMEOUT_S, settings.media_timeout_s))
        self._session: aiohttp.ClientSession | None = None

    def allowed(self, url: str) -> bool:
        """Whether a payload's URL may be fetched at all (its first hop)."""
        parsed = urlparse(url)
        try:
            return parsed.scheme in ("http", "https") and bool(parsed.hostname) \
                and host_port(url) in self._allowed
        except ValueError:  # a port that is not a number
            return False

    def _hop_refusal(self, url: str) -> str:
        """Why a redirect target may not be fetched ('' when it may)."""
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            return f"a redirect to a non-http(s) URL ({parsed.scheme or 'none'}:)"
        try:
            hop = host_port(url)
        except ValueError:
            return "a redirect to a URL with a bad port"
        if hop in self._allowed or not _is_ip(parsed.hostname) or is_public(parsed.hostname):
            return ""  # a host name is checked once resolved (_GuardedResolver)
        return f"a redirect to the non-public address {parsed.hostname}"

    def _session_for_use(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=_GuardedResolver(self._allowed), limit=32)
            self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                                  timeout=self._timeout)
        return self._session

    async def fetch(self, url: str) -> Download:
        if not self.allowed(url):
            raise DownloadError("refused", f"not a Chatwoot URL (MEDIA_ALLOWED_HOSTS): {_shown(url)}")
        try:
            async with asyncio.timeout(self._timeout.total):
                return await self._follow(url)
        except TimeoutError:
            raise DownloadError("timeout", f"no file within {self._timeout.total:g} s",
                                transient=True) from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, _RefusedAddress):
                raise DownloadError("refused", str(exc.os_error)) from None
            raise DownloadError("failed", f"cannot connect to {exc.host}:{exc.port}",
                                transient=True) from None
        except aiohttp.ClientError as exc:
            # Not str(exc): some carry the whole URL, whose signed id is a lasting capability.
            raise DownloadError("failed", f"{type(exc).__name__} fetching {_shown(url)}",
                                transient=True) from None

    async def _follow(self, url: str) -> Download:
        session = self._session_for_use()
        for _ in range(_MAX_REDIRECTS + 1):
            parsed = urlparse(url)
            own = f"{parsed.scheme}://{host_port(url)}" == self._chatwoot
            headers = {"api_access_token": self._token} if own and self._token else {}
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                if resp.status in _REDIRECTS:
                    target = urljoin(url, resp.headers.get("Location", ""))
                    if refusal := self._hop_refusal(target):
                        raise DownloadError("refused", refusal)
                    url = target
                    continue
                if resp.status != 200:
                    raise DownloadError("http_error", f"HTTP {resp.status} from {_shown(url)}",
                                        transient=resp.status >= 500 or resp.status in (408, 429))
                if resp.content_length is not None and resp.content_length > self.max_bytes:
                    raise DownloadError("too_large", f"{resp.content_length} bytes, more than "
                                        f"MAX_MEDIA_BYTES ({self.max_bytes})")
                data = bytearray()
                while chunk := await resp.content.read(self.max_bytes + 1 - len(data)):
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise DownloadError("too_large", f"more than MAX_MEDIA_BYTES ({self.max_bytes})")
                return Download(bytes(data), resp.content_type or "")
        raise DownloadError("refused", f"more than {_MAX_REDIRECTS} redirects")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
