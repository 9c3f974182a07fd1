"""The errors imsight raises on purpose.

    ImsightError
    ├── ConfigError          bad configuration; only the entry point exits on it
    ├── BadInput             a caller sent something we refuse (HTTP status carried as data)
    │   ├── Unauthorized     401: missing, forged or replayed credentials
    │   ├── Forbidden        403: a credential that does not match (Telegram's secret token)
    │   ├── TooLarge         413: a body or image over a limit
    │   ├── NotAnImage       415: bytes that no supported image decoder accepts
    │   ├── NotFound         404: an unknown job or chat
    │   ├── Conflict         409: an id reused for something else
    │   └── Busy             429: the question was turned away for now (queue full, rate limit)
    ├── StoreUnavailable     the history store cannot take writes (disk full, locked)
    ├── AdapterError         a platform call failed
    │   └── RateLimited      the platform said "too many requests": not before retry_after_s
    ├── StartupError         a part of the daemon could not start; the message says what to fix
    └── EngineError          the model could not answer
        ├── ModelUnavailable the model's files are not on this machine
        ├── EngineUnavailable the model server cannot be reached now (may pass: retry later)
        └── EngineOutOfMemory the GPU ran out of memory, even after a retry with smaller images

This module is the neutral ground that ``bot``, ``adapters`` and ``core`` all import; it imports
none of them. (The contract between the daemon and the platforms is ``adapters.base``.)
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "BadInput",
    "Busy",
    "ConfigError",
    "Conflict",
    "EngineError",
    "EngineOutOfMemory",
    "EngineUnavailable",
    "Forbidden",
    "ImsightError",
    "ModelUnavailable",
    "NotAnImage",
    "NotFound",
    "RateLimited",
    "ShuttingDown",
    "StartupError",
    "StoreUnavailable",
    "TooLarge",
    "Unauthorized",
    "one_line",
]


def one_line(exc: BaseException) -> str:
    """An exception in one line, for a log message (dynamo's and CUDA's run to pages)."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class ImsightError(Exception):
    """Anything we raise on purpose."""


class ConfigError(ImsightError):
    """The configuration is unusable; the message names the key."""


class BadInput(ImsightError):
    """Input we refuse; the HTTP layer answers with ``status`` and ``code``."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class Unauthorized(BadInput):
    status = 401
    code = "unauthorized"


class Forbidden(BadInput):
    status = 403
    code = "forbidden"


class TooLarge(BadInput):
    status = 413
    code = "too_large"


class NotAnImage(BadInput):
    status = 415
    code = "not_an_image"


class NotFound(BadInput):
    status = 404
    code = "not_found"


class Conflict(BadInput):
    status = 409
    code = "conflict"


class Busy(BadInput):
    status = 429
    code = "busy"

    def __init__(self, message: str, *, retry_after_s: int = 60) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(BadInput):
    """The daemon is stopping and takes nothing more in; the sender should deliver it again later."""

    status = 503
    code = "shutting_down"


class StoreUnavailable(ImsightError):
    """The store refused a write; nothing was half-written."""


class AdapterError(ImsightError):
    """A platform call failed."""

    def __init__(self, platform: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(f"{platform}: {message}")
        self.platform = platform
        self.retryable = retryable


class RateLimited(AdapterError):
    """The platform refused the call for now and said when to call again (for this chat)."""

    def __init__(self, platform: str, message: str, *, retry_after_s: float) -> None:
        super().__init__(platform, message, retryable=True)
        self.retry_after_s = retry_after_s


class StartupError(ImsightError):
    """A part of the daemon could not start; the message is one line with the fix, no secret."""


class EngineError(ImsightError):
    """The engine failed to produce an answer."""


class ModelUnavailable(EngineError):
    """The configured model cannot be loaded here; the message says how to fix it."""


class EngineUnavailable(EngineError):
    """The model server cannot be reached or is overloaded; the question may be asked again later."""


class EngineOutOfMemory(EngineError):
    """Out of GPU memory even with smaller images."""
