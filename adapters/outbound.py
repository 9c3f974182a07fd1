"""Where the daemon may send requests that a caller names (callback URLs, image URLs), and only there.

A name is allowed by ``allowed_callback_hosts``; the address it resolves to is checked too, and the
connection goes to exactly that checked address (the resolver below is the connector's only
source of addresses), so a DNS answer that changes between check and connect cannot swap in an
internal host. Cloud metadata (link-local) and unroutable addresses are never reached; loopback
and private addresses only when the allowlist names that address itself.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from core.errors import BadInput, TooLarge

_CHUNK = 256 * 1024

__all__ = ["CallbackRefused", "HostList", "PinnedResolver", "fetch_image"]


class HostList:
    """``example.com`` allows that host; ``.example.com`` its subdomains; an IP allows that address."""

    def __init__(self, entries: Sequence[str], key: str) -> None:
        self._entries = [e.lower().strip("[]") for e in entries]
        self.key = key

    def __bool__(self) -> bool:
        return bool(self._entries)

    def allows(self, host: str) -> bool:
        host = host.lower().strip("[]")
        return any(host == e or (e.startswith(".") and host.endswith(e)) for e in self._entries)

    def check_url(self, url: str) -> None:
        """400 naming the config key, for a URL this list does not allow."""
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"}:
            raise BadInput(f"callback_url must be http(s): {url!r}", code="callback_url_refused")
        if not self:
            raise BadInput(f"callbacks are off: no host is in {self.key}", code="callback_url_refused")
        host = parts.hostname or ""
        if not self.allows(host):
            raise BadInput(f"callback host {host!r} is not in {self.key}", code="callback_url_refused")
        if _is_ip(host) and not self.reachable(host):  # a literal address is never resolved, so check it here
            raise BadInput(f"callbacks may not reach {host}", code="callback_url_refused")

    def reachable(self, address: str) -> bool:
        """Whether a connection to this resolved address may be made."""
        ip = ipaddress.ip_address(address)
        if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
            return False  # 169.254.169.254 is every cloud's metadata service
        if ip.is_loopback or ip.is_private:
            return address.lower() in self._entries  # only when the allowlist names the address itself
        return True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class CallbackRefused(OSError):
    """A callback's host or address is not one the daemon may reach; trying again will not change that."""


class PinnedResolver(AbstractResolver):
    """Resolves only allowed names, and returns only addresses that are safe to connect to."""

    def __init__(self, hosts: HostList) -> None:
        self._hosts = hosts
        self._resolver = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        if not self._hosts.allows(host):
            raise CallbackRefused(f"{host} is not an allowed callback host")
        results = await self._resolver.resolve(host, port, family)
        safe = [r for r in results if self._hosts.reachable(r["host"])]
        if not safe:
            raise CallbackRefused(f"{host} resolves only to addresses callbacks may not reach")
        return safe

    async def close(self) -> None:
        await self._resolver.close()


async def fetch_image(session: aiohttp.ClientSession, url: str, hosts: HostList, *, max_bytes: int,
                      limits: aiohttp.ClientTimeout) -> bytes:
    """An image a caller names by URL: from a host ``hosts`` allows only, within ``max_bytes`` and the
    timeout, no redirects (one could lead to a host that is not allowed)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in {"http", "https"}:
        raise BadInput(f"image URL must be http(s): {url!r}", code="image_url_refused")
    if not hosts.allows(host):
        raise BadInput(f"image host {host!r} is not in {hosts.key}", code="image_url_refused")
    try:
        async with session.get(url, allow_redirects=False, timeout=limits) as resp:
            if resp.status != 200:
                raise BadInput(f"image URL answered HTTP {resp.status}", code="image_fetch_failed")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise TooLarge(f"image at {url!r} is over the {max_bytes}-byte limit")
            data = bytearray()
            async for chunk in resp.content.iter_chunked(_CHUNK):  # to the end: servers send pieces
                data += chunk
                if len(data) > max_bytes:
                    raise TooLarge(f"image at {url!r} is over the {max_bytes}-byte limit")
            return bytes(data)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BadInput(f"could not fetch image URL: {exc or type(exc).__name__}", code="image_fetch_failed") from None
