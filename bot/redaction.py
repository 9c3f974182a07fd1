"""Secrets never reach a log line: every record is scrubbed of the configured secrets as it is made.

A record factory, not a handler filter: it covers every logger, libraries' included (httpx logs
each Telegram Bot API URL, token and all, at INFO), and handlers added later (pytest's, say).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["redact_in_logs", "scrub"]

_MASK = "<redacted>"
_secrets: set[str] = set()
_installed = False
_formatter = logging.Formatter()


def redact_in_logs(secrets: Iterable[str]) -> None:
    """From now on, replace each of ``secrets`` (those of 6 characters or more) in every log record, and
    escape control characters in its arguments (an id with a newline would forge a log line)."""
    global _installed
    _secrets.update(s for s in secrets if len(s) >= 6)  # shorter ones would mask ordinary words
    if _installed:
        return
    make = logging.getLogRecordFactory()

    def scrubbed(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.msg = _scrub(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_escaped(_scrub(a)) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _escaped(_scrub(v)) for k, v in record.args.items()}
        if record.exc_info and record.exc_info[0] is not None:
            # Formatters reuse exc_text once set: an exception's message may hold a URL with a token.
            record.exc_text = _scrub(_formatter.formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(scrubbed)
    _installed = True


_CONTROL = {n: f"\\x{n:02x}" for n in [*range(32), 127]} | {10: "\\n", 13: "\\r", 9: "\\t"}


def _escaped(value: Any) -> Any:
    """Strings of a log line's arguments come from requests: no character in them may start a new line."""
    if isinstance(value, str):
        return value.translate(_CONTROL)
    return value


def scrub(text: str) -> str:
    """``text`` with every secret registered by ``redact_in_logs`` masked (for what is printed, not logged)."""
    return str(_scrub(text))


def _scrub(value: Any) -> Any:
    if isinstance(value, str | bytes) or not isinstance(value, int | float | type(None)):
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if any(secret in text for secret in _secrets):
            for secret in _secrets:
                text = text.replace(secret, _MASK)
            return text
    return value
