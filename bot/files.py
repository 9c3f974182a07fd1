"""Image bytes on disk, content-addressed by SHA-256, private to the daemon's user."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from core.errors import StoreUnavailable

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
        try:
            self._write(path, data)
        except OSError as exc:  # disk full, read-only, quota: refuse the message, clearly
            raise StoreUnavailable(f"cannot store the image: {exc.strerror or exc}") from exc
        return path

    def _write(self, path: Path, data: bytes) -> None:
        # One level at a time: mkdir(parents=True) would create the missing parents with the umask's mode.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        # Its own temporary name: two chats may store the same image at the same moment, on two threads.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
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

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def older_than(self, age_s: float) -> Iterator[tuple[str | None, Path]]:
        """Files (digest, path) last written over ``age_s`` ago; digest None for a write cut off by a crash."""
        limit = time.time() - age_s
        for path in self.root.glob("??/*"):
            try:
                if path.stat().st_mtime >= limit:
                    continue
            except FileNotFoundError:
                continue
            yield (path.name if _SHA256.fullmatch(path.name) else None), path

    def delete(self, sha256: str) -> None:
        """Remove an image no message refers to any more (gone already is fine)."""
        self.path(sha256).unlink(missing_ok=True)
