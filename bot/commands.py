"""Chat commands, for every platform: /help (/start), /status, /images, /use N, /forget.

Adapters only report a command (``Incoming.command``, where their platform marks one) and whether
the sender may administer the chat; every answer is made here, one help text for all.

A command is answered at once, through the outbox like an answer. ``/use N`` is stored as a
message of its own carrying image N, so the context rules (the latest image in the thread or the
chat) pick it for the questions that follow: no separate state to keep in step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from adapters.base import Incoming, Status
from bot.store import Store, StoredMessage

__all__ = ["COMMANDS", "HELP", "Command", "Commands", "parse", "status_text"]

COMMANDS = ("/images", "/use", "/forget", "/help", "/start", "/status")
HELP = """I answer questions about images.
- Post a screenshot and mention me with your question; reply to my answer to follow up (no mention needed).
- Reply to an image and mention me to ask about that one; in a direct chat, just send the image and the question.
- /ask <question> asks about the latest image here (Telegram).
- /images lists the images I remember here, numbered; /use N makes your next questions here about image N.
- /forget deletes what I stored for this chat (the chat's admins; it asks first).
- /status says which model answers and how many questions are waiting.
- /help shows this."""
_LISTED = 10  # the images of the newest this many messages with images
_FORGET_CONFIRM_S = 300.0


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    argument: str


def parse(text: str, marked: str = "") -> Command | None:
    """``/name args`` when the text starts with one of ``COMMANDS`` (``/name@bot`` too), or with
    ``marked``, a command the platform marked as one (then any name: an unknown one is answered so)."""
    head, _, rest = text.strip().partition(" ")
    name = head.split("@", 1)[0].lower()
    return Command(name, rest.strip()) if name in COMMANDS or (marked and name == marked) else None


def status_text(status: Status) -> str:
    return (f"Model: {status.model} ({status.engine}). Questions being answered: {status.running}; "
            f"waiting: {status.queued}.")


class Commands:
    """Answers commands; ``forget`` is the daemon's own (it also deletes image files)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._forget_asked: dict[tuple[str, str], float] = {}  # chat -> until when "/forget yes" confirms

    async def images(self, incoming: Incoming) -> str:
        listed = await self._store.recent_images(incoming.platform, incoming.chat_id, incoming.thread_id, _LISTED)
        if not listed:
            return "I don't remember any images here yet. Post one, then ask about it."
        lines = [f"{n}. {_when(m)} from {m.sender_name or m.sender_id or 'someone'}"
                 for n, (_, m) in enumerate(listed, start=1)]
        return "Images I remember here, oldest first:\n" + "\n".join(lines) + "\n/use N makes the next questions " \
            "about image N."

    async def chosen(self, incoming: Incoming, argument: str) -> tuple[str, tuple[str, ...]]:
        """The reply to ``/use N``, and the image the command message should carry (none when N is wrong)."""
        listed = await self._store.recent_images(incoming.platform, incoming.chat_id, incoming.thread_id, _LISTED)
        if not argument.isdigit() or not 1 <= int(argument) <= len(listed):
            return (f"There is no image {argument or '(none given)'} here; /images lists them "
                    f"(1 to {len(listed)}).", ())
        sha, message = listed[int(argument) - 1]
        return (f"OK: the next questions here are about image {argument} ({_when(message)} from "
                f"{message.sender_name or message.sender_id or 'someone'}).", (sha,))

    def forget_confirmed(self, incoming: Incoming, argument: str) -> bool:
        """``/forget`` asks first; ``/forget yes`` within five minutes of that confirms."""
        key = (incoming.platform, incoming.chat_id)
        if argument.lower() == "yes" and self._forget_asked.pop(key, 0.0) >= time.monotonic():
            return True
        self._forget_asked[key] = time.monotonic() + _FORGET_CONFIRM_S
        return False


def _when(message: StoredMessage) -> str:
    return datetime.fromtimestamp(message.created_at).strftime("%Y-%m-%d %H:%M")
