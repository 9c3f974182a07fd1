"""Feishu/Lark event-callback security: AES-256-CBC bodies and the request signature.

With an Encrypt Key set, Feishu posts ``{"encrypt": base64(iv || AES-256-CBC(sha256(key), iv,
PKCS#7(json)))}`` and signs the raw body: ``sha256(timestamp + nonce + key || body)`` in lowercase
hex (plain SHA-256, not HMAC). PROTOCOLS.md §1.3-1.4 and its test vectors V1-V3.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from core.errors import Unauthorized

__all__ = ["decrypt", "encrypt", "signature", "verify_signature"]

_BLOCK = 16


def decrypt(encrypt_key: str, body: str) -> str:
    """The JSON text inside an ``encrypt`` field; ``Unauthorized`` when it is not one of ours."""
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Unauthorized("encrypted body is not base64") from exc
    if len(raw) < 2 * _BLOCK or len(raw) % _BLOCK:
        raise Unauthorized("encrypted body has a wrong length")
    decryptor = Cipher(algorithms.AES(_key(encrypt_key)), modes.CBC(raw[:_BLOCK])).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plain = unpadder.update(decryptor.update(raw[_BLOCK:]) + decryptor.finalize()) + unpadder.finalize()
        return plain.decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:  # wrong key: the padding or the text is garbage
        raise Unauthorized("encrypted body does not decrypt with the configured encrypt_key") from exc


def encrypt(encrypt_key: str, plaintext: str, iv: bytes) -> str:
    """What Feishu sends in ``encrypt``: for tests and fakes (the daemon only decrypts)."""
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(_key(encrypt_key)), modes.CBC(iv)).encryptor()
    data = padder.update(plaintext.encode("utf-8")) + padder.finalize()
    return base64.b64encode(iv + encryptor.update(data) + encryptor.finalize()).decode("ascii")


def signature(timestamp: str, nonce: str, encrypt_key: str, raw_body: bytes) -> str:
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode("utf-8") + raw_body).hexdigest()


def verify_signature(timestamp: str, nonce: str, given: str, encrypt_key: str, raw_body: bytes) -> None:
    """Check ``X-Lark-Signature`` over the exact bytes received; ``Unauthorized`` when it does not match."""
    expected = signature(timestamp, nonce, encrypt_key, raw_body)
    if not (timestamp and nonce and hmac.compare_digest(expected, given.lower())):
        raise Unauthorized("X-Lark-Signature does not match the request")


def _key(encrypt_key: str) -> bytes:
    return hashlib.sha256(encrypt_key.encode("utf-8")).digest()
