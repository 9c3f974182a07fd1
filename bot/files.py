"""Image bytes on disk, content-addressed by SHA-256, private to the daemon's user."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["ImageFiles"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ImageFiles:
    """``root/ab/abcdef...``: one file per distinct image, written once, never modified."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        # The id may come from a request: only a well-formed digest may ever become a path.
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, sha256: str, data: bytes) -> Path:
        """Store ``data`` under its digest unless it is there already; durable when this returns."""
        path = self.path(sha256)
        if path.exists():
            return path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{sha256}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            # rename is atomic: a crash leaves the old state or the whole file, never half of it.
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def delete(self, sha256: str) -> None:
        """Remove an image no message refers to any more (gone already is fine)."""
        self.path(sha256).unlink(missing_ok=True)
