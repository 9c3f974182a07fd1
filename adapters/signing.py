"""Standard Webhooks signatures (https://www.standardwebhooks.com), over raw body bytes.

The reference library decodes the body as UTF-8 before signing, which multipart uploads of
images are not; the scheme itself is HMAC-SHA256 over ``id.timestamp.body``, done here on bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

from core.errors import ConfigError, Unauthorized

__all__ = ["TOLERANCE_S", "StandardWebhookSigner", "Verification"]

TOLERANCE_S = 300  # timestamps more than 5 minutes old (or ahead) are refused: replay protection


class StandardWebhookSigner:
    def __init__(self, secret: str) -> None:
        encoded = secret.removeprefix("whsec_")
        try:
            self._key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError("adapters.webhook.secret: not 'whsec_' followed by base64") from None
        if not self._key:
            raise ConfigError("adapters.webhook.secret: empty")

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        mac = hmac.new(self._key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        return "v1," + base64.b64encode(mac).decode()

    def headers(self, msg_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        timestamp = int(time.time() if now is None else now)
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signature(msg_id, timestamp, body),
        }

    def verify(self, headers: Mapping[str, str], body: bytes, now: float | None = None) -> str:
        """Return the verified ``webhook-id``; raise ``Unauthorized`` otherwise."""
        check = self.verification(headers, now)
        check.update(body)
        return check.finish()

    def verification(self, headers: Mapping[str, str], now: float | None = None) -> Verification:
        """Check the headers now (before any of the body is read); the body is fed to the result."""
        msg_id = headers.get("webhook-id", "")
        stamp = headers.get("webhook-timestamp", "")
        signatures = headers.get("webhook-signature", "")
        if not (msg_id and stamp and signatures):
            raise Unauthorized("webhook-id, webhook-timestamp and webhook-signature are all required")
        try:
            timestamp = int(stamp)
        except ValueError:
            raise Unauthorized("webhook-timestamp is not an integer") from None
        current = time.time() if now is None else now
        if abs(current - timestamp) > TOLERANCE_S:
            raise Unauthorized("webhook-timestamp is outside the 5-minute window (replayed or clock skew)")
        mac = hmac.new(self._key, f"{msg_id}.{timestamp}.".encode(), hashlib.sha256)
        return Verification(msg_id, mac, signatures.split())


class Verification:
    """A signature being checked over a body that streams in."""

    def __init__(self, msg_id: str, mac: hmac.HMAC, candidates: list[str]) -> None:
        self._msg_id, self._mac, self._candidates = msg_id, mac, candidates

    def update(self, chunk: bytes) -> None:
        self._mac.update(chunk)

    def finish(self) -> str:
        """The verified ``webhook-id``, or ``Unauthorized``."""
        expected = ("v1," + base64.b64encode(self._mac.digest()).decode()).encode()
        # Several space-separated signatures may be sent while a secret is rotated.
        if any(hmac.compare_digest(expected, c.encode("utf-8", "replace")) for c in self._candidates):
            return self._msg_id
        raise Unauthorized("webhook-signature does not match")
