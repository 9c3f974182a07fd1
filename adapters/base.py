"""The contract between the daemon (``bot``) and the platforms (``adapters``).

An adapter (``Adapter``) owns one platform whole. The daemon gives it one thing, a ``Host``, and
from then on:

- events come in as ``Incoming`` through ``Host.accept``, which commits them before it returns:
  the adapter acknowledges the platform only after that, and makes no platform call before it
  (what needs one, reading back a replied-to message say, is done after: ``ReadsReplies``);
- images it only names are fetched through its ``download`` after the acknowledgement;
- replies go out through its ``send``; a platform that can show an answer while it is written
  also implements ``Drafting``; a refusal "for now" is ``core.errors.RateLimited``, never a sleep;
- optional abilities are small protocols checked with ``isinstance``: ``Connected`` (for
  ``/readyz``), ``Moderated`` (who administers a chat), ``Pulling`` (an adapter that fetches its
  own events stops that first when the daemon stops), ``ReadsReplies``.

Each platform also declares its ``[adapters.<name>]`` section as a ``PlatformSettings`` subclass
in its own module: fields, requirements, a factory, doctor checks; secrets are its ``SecretStr``
fields. ``adapters.registry`` lists them; the daemon, config, doctor and log scrubbing loop over it.

Platform ids are opaque strings here: the daemon only stores and compares them.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, SecretStr

from core.engine import Turn

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "Accepted",
    "Adapter",
    "Connected",
    "ConnectionState",
    "Deployment",
    "Drafting",
    "Finding",
    "HistoryEntry",
    "Host",
    "ImageRef",
    "Incoming",
    "JobView",
    "Keyed",
    "Moderated",
    "PlatformSettings",
    "Pulling",
    "Pushed",
    "ReadsReplies",
    "Replied",
    "Reply",
    "Status",
    "Verifiable",
]

ChatKind = Literal["direct", "group"]
Role = Literal["user", "bot"]
JobStatus = Literal["queued", "running", "done", "failed"]


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image as a platform names it; ``data`` holds the bytes when they came inline."""

    ref: str = ""
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message received from a platform, already translated."""

    platform: str
    chat_id: str
    message_id: str
    event_id: str = ""
    chat_kind: ChatKind = "group"
    thread_id: str | None = None
    reply_to: str | None = None
    sender_id: str = ""
    sender_name: str = ""
    text: str = ""  # the question, with mentions of the bot removed
    addressed: bool = False  # direct chat, mention, reply to the bot, or a command
    # A command the platform itself marks as one (Telegram's bot_command), lower case: "/status".
    # ``text`` still starts with it. Where platforms mark none, the daemon reads known ones from the text.
    command: str = ""
    # Whether the sender may use admin commands (/forget), as the platform or the configured admins
    # say; ``None``: they do not say (the daemon then asks a ``Moderated`` adapter, after the ack).
    sender_is_admin: bool | None = None
    images: tuple[ImageRef, ...] = ()
    # Adapter-private facts the adapter needs again when it replies (a callback URL, say).
    meta: Mapping[str, str] = field(default_factory=dict)
    received_at: float = field(default_factory=time.time)
    # A digest of what the event said, where the sender picks its event ids (the generic API's
    # webhook-id): the same id again with another fingerprint is a conflict, not a redelivery.
    fingerprint: str = ""
    # The conversation so far as the asker sends it (an OpenAI-style client: stateless): the answer is
    # about these turns and this message's images, nothing looked up. ``None``: the chat's own history.
    conversation: tuple[Turn, ...] | None = None
    max_new_tokens: int = 0  # the asker's own limit on the answer (0: the daemon's)


@dataclass(frozen=True, slots=True)
class Accepted:
    """What the daemon did with an ``Incoming``."""

    message_id: str
    images: tuple[str, ...]  # SHA-256 of each image of the message, in order
    job_id: str | None  # set when the message asked the bot something
    duplicate: bool = False  # seen before: nothing new was stored
    pending: bool = False  # committed; images still downloading, the message and job come after
    refused: str | None = None  # the question was turned away (busy, rate limit); the asker is told why


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer (or a failure notice) to deliver for one job."""

    platform: str
    chat_id: str
    job_id: str
    reply_to: str  # the question's message id
    thread_id: str | None
    text: str  # Markdown
    images: tuple[str, ...]  # SHA-256 of the images the answer is about
    failed: bool = False
    meta: Mapping[str, str] = field(default_factory=dict)  # the question's ``Incoming.meta``
    notice: bool = False  # a word while the asker waits (the answer is late); the answer follows
    draft_id: str | None = None  # the placeholder shown while answering (``Drafting``), if any: it becomes the answer
    # An earlier attempt at this answer ran (the daemon restarted, or the engine failed once): a placeholder it
    # showed may be on the platform although ``draft_id`` is unknown (posted, then the daemon died).
    retried: bool = False
    usage: tuple[int, int] | None = None  # the answer's prompt and answer tokens, where the engine counted them


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as callers see it."""

    job_id: str
    status: JobStatus
    platform: str
    chat_id: str
    question_id: str
    answer: str | None
    answer_message_id: str | None
    images: tuple[str, ...]
    error: str | None


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One stored message of a chat."""

    message_id: str
    role: Role
    thread_id: str | None
    reply_to: str | None
    sender_id: str
    sender_name: str
    text: str
    images: tuple[str, ...]
    created_at: float
    answers: str | None = None  # bot answers: the question's message id
    used_images: tuple[str, ...] = ()  # bot answers: the images the answer was about


@dataclass(frozen=True, slots=True)
class Status:
    """What the bot is doing, for a chat command or a health page."""

    engine: str
    model: str
    queued: int  # questions waiting, all chats
    running: int  # questions being answered now


class Host(Protocol):
    """What the daemon offers adapters."""

    async def accept(self, incoming: Incoming, *, refuse_when_busy: bool = False) -> Accepted:
        """Take a message in; queue a job when it asks something.

        When the question must be turned away (busy), a chat adapter's asker is told so in the chat;
        with ``refuse_when_busy`` nothing is stored and ``Busy`` (HTTP 429) is raised instead.
        """
        ...

    async def job(self, job_id: str) -> JobView: ...

    async def wait_for_job(self, job_id: str, timeout_s: float) -> JobView: ...

    async def history(self, platform: str, chat_id: str, limit: int) -> Sequence[HistoryEntry]: ...

    async def forget(self, platform: str, chat_id: str) -> int | None:
        """Delete a chat's stored messages and images; ``None`` while it has a question in progress."""
        ...

    async def status(self) -> Status: ...


class Adapter(Protocol):
    """One platform, seen from the daemon."""

    name: str

    def mount(self, app: web.Application) -> None:
        """Add this adapter's HTTP routes to the daemon's one aiohttp app (before it starts)."""

    async def start(self, host: Host) -> None: ...

    async def stop(self) -> None: ...

    async def download(self, image: ImageRef) -> bytes: ...

    async def send(self, reply: Reply) -> str:
        """Deliver ``reply``; return the platform's id of the sent message."""


@runtime_checkable
class Drafting(Protocol):
    """An adapter that can show an answer while it is being written (a placeholder it edits)."""

    async def draft(self, reply: Reply) -> str | None:
        """Show ``reply.text``, the answer so far ("" before the first words); ``send`` delivers the end.

        Returns the placeholder's message id; it is kept with the job, so that after a restart the
        same placeholder is edited (``reply.draft_id``) rather than a second one left behind.
        Best effort: a failure here must not lose the answer, which ``send`` still delivers.
        """


@runtime_checkable
class Moderated(Protocol):
    """An adapter whose platform says who administers a chat (for commands such as /forget)."""

    async def is_admin(self, incoming: Incoming) -> bool:
        """Whether the sender of ``incoming`` may administer its chat (a direct chat's one person may)."""
        ...


@dataclass(frozen=True, slots=True)
class Replied:
    """The message a question replies to, as read back from its platform."""

    message: Incoming  # to take in (never addressed): its images to download and keep
    by_bot: bool  # the bot's own message: a reply to it is addressed to the bot


@runtime_checkable
class ReadsReplies(Protocol):
    """An adapter that can read a message back from its platform: for a reply to a message the daemon
    never stored (a bot that is pushed only its mentions never saw the image a question replies to)."""

    async def replied(self, incoming: Incoming) -> Replied | None:
        """The message ``incoming.reply_to`` names, or ``None`` when it cannot be read (deleted, hidden).

        Called by the daemon after ``incoming`` was acknowledged and committed, never inside
        ``Host.accept``: a platform that redelivers unacknowledged events must not wait on this call.
        """
        ...


@runtime_checkable
class Pulling(Protocol):
    """An adapter that fetches its events itself (long polling; a platform's outbound connection)
    rather than being sent them through the daemon's HTTP server."""

    async def stop_intake(self) -> None:
        """Take no more events in: ``Host.accept`` is not called after this returns. The daemon calls
        it first when it stops, before it drains answers; ``stop`` comes after that. What was fetched
        but not taken in stays unconfirmed, for the platform to deliver again after the restart."""
        ...


@runtime_checkable
class Verifiable(Protocol):
    """An adapter that can try its credentials without starting (for ``imsight doctor --online``)."""

    async def credentials(self) -> str:
        """What the platform granted (a token issued, say); raises with what it said otherwise."""
        ...


@dataclass(frozen=True, slots=True)
class ConnectionState:
    """An outbound connection a platform pushes events through, as ``/metrics`` shows it."""

    platform: str
    open: bool
    reconnects: int  # connections opened after the first one


@runtime_checkable
class Pushed(Protocol):
    """An adapter whose platform pushes events over a connection the adapter opened (Feishu's long
    connection, DingTalk's Stream mode)."""

    @property
    def connection(self) -> ConnectionState | None:
        """``None`` while the adapter takes its events another way (callbacks)."""
        ...


@runtime_checkable
class Keyed(Protocol):
    """An adapter whose callers sign in with named keys (the OpenAI-compatible endpoint)."""

    def requests_by_key(self) -> Mapping[str, int]:
        """Requests answered or refused so far, by the key's name (for ``/metrics``)."""
        ...


@runtime_checkable
class Connected(Protocol):
    """An adapter that can tell whether its platform is reachable now (for ``/readyz``)."""

    @property
    def connected(self) -> bool: ...


# ---- a platform's configuration -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deployment:
    """What a platform's section is checked against and its adapter built with, besides itself."""

    server_host: str = "127.0.0.1"
    loopback_only: bool = True  # the server is reachable from this machine alone
    max_body_bytes: int = 32 * 2**20  # the generic API's bodies
    max_image_bytes: int = 20 * 2**20
    admin_token: str | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    """One line ``imsight doctor`` prints about a platform."""

    status: Literal["ok", "warn", "fail"]
    detail: str
    fix: str = ""


class PlatformSettings(BaseModel, ABC):  # pydantic's metaclass is an ABCMeta
    """A platform's ``[adapters.<name>]`` section. Its module subclasses this with its own fields;
    every ``SecretStr`` field is a secret: kept out of logs and config errors, and read from
    ``IMSIGHT_<NAME>_<FIELD>`` when that is set."""

    # A typo must not fall back silently to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    doctor_label: ClassVar[str] = ""  # the name doctor shows; the section's name when empty
    online_fix: ClassVar[str] = ""  # what to do when ``online`` fails

    def problems(self, deployment: Deployment) -> Iterator[tuple[str, str]]:
        """What this section lacks while enabled, as ``(key, what to do)``; key "" for the section."""
        return iter(())

    @abstractmethod
    def build(self, deployment: Deployment) -> Adapter:
        """The adapter, from a section that has no ``problems``."""

    def findings(self, deployment: Deployment) -> Iterator[Finding]:
        """``imsight doctor``'s offline lines about this platform (nothing is called)."""
        return iter(())

    async def online(self) -> str | None:
        """``imsight doctor --online``: try the credentials for real; what worked, or raise with what
        the platform said. ``None``: nothing to try. By default: the adapter's own ``Verifiable`` check."""
        adapter = self.build(Deployment())
        return await adapter.credentials() if isinstance(adapter, Verifiable) else None

    def secret_values(self) -> list[str]:
        return [value.get_secret_value() for value in vars(self).values() if isinstance(value, SecretStr)]
