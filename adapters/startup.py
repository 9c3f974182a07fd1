"""Why a platform could not start, in one line an operator can act on.

Libraries' own messages are not shown: python-telegram-bot's InvalidToken names the token, and
an unreachable API surfaces as a hundred lines of httpx or aiohttp traceback. The cause chain is
walked for the first exception we can name; the line says what failed and what to check.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

__all__ = ["explain"]

_SECTION = "[adapters.{platform}]"


def explain(platform: str, exc: BaseException, endpoint: str = "") -> str:
    """``"<platform>: <what failed>. Fix: <what to check>"``; never a library exception's own text."""
    where = f" at {endpoint}" if endpoint else ""
    section = _SECTION.format(platform=platform)
    chain = list(_chain(exc))
    names = {type(cause).__name__ for cause in chain}

    def found(*types: type[BaseException], named: tuple[str, ...] = ()) -> bool:
        return any(isinstance(c, types) for c in chain) or any(n in names for n in named)

    network = f"Fix: check the network path or proxy (HTTPS_PROXY) to it, or base_url in {section}"
    refused = [c for c in chain if type(c).__name__ == "AdapterError" and not getattr(c, "retryable", True)]
    if refused or "InvalidToken" in names:
        # Our own words (what the platform answered) are shown; not where they wrap a library's exception,
        # whose text may hold the token (python-telegram-bot's InvalidToken).
        ours = refused[0] if refused and refused[0].__cause__ is None and refused[0].__context__ is None else None
        said = f" ({str(ours).removeprefix(platform + ': ')})" if ours is not None else ""
        return (f"{platform}: the platform refused the bot's credentials{where}{said}. "
                f"Fix: check the token or app secret in {section} (or its IMSIGHT_* variable)")
    if found(ssl.SSLError, named=("ClientSSLError", "ClientConnectorCertificateError")):
        return (f"{platform}: TLS failed talking to the API{where}. Fix: check this host's clock and CA "
                "certificates, or a TLS-inspecting proxy (point SSL_CERT_FILE at its CA)")
    if found(socket.gaierror, named=("ClientConnectorDNSError",)):
        return (f"{platform}: cannot resolve the API's host name{where}. "
                f"Fix: check DNS on this host, or base_url in {section}")
    if found(TimeoutError, named=("TimedOut", "ReadTimeout", "ConnectTimeout", "PoolTimeout")):
        return f"{platform}: the API did not answer in time{where}. {network}"
    if found(OSError, named=("NetworkError", "ConnectError", "ClientConnectorError", "ClientError")):
        return f"{platform}: cannot connect to the API{where}. {network}"
    return (f"{platform}: could not start ({type(exc).__name__}){where}. "
            "Fix: run `imsight run -v` for the full traceback")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
