"""What a question carries from intake to its answer: why it is about its images, the turns sent
along, and what else the answer must say. Kept as JSON with its job (``jobs.context``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["About", "JobContext"]


@dataclass(frozen=True, slots=True)
class About:
    """Who posted the images a question is about, and when (when not in the question's own message)."""

    sender_name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class JobContext:
    rule: int = 0  # the context rule that chose the images (bot.context: OWN, REPLY, THREAD, RECENT, NONE)
    turns: tuple[int, ...] = ()  # message rows of earlier questions and answers, oldest first
    about: About | None = None
    image_problems: tuple[str, ...] = ()  # why the asker's own images could not be taken
    command: str = ""  # a chat command's name; its reply is stored with the job
    given: tuple[tuple[str, str], ...] = ()  # (role, text) turns the asker sent along (``Incoming.conversation``)
    max_new_tokens: int = 0  # the asker's limit on the answer; 0: the daemon's

    def to_json(self) -> str:
        # ``turns`` always present: retention reads it with SQLite's json_each.
        return json.dumps({key: value for key, value in asdict(self).items() if value or key == "turns"})

    @classmethod
    def from_json(cls, text: str) -> JobContext:
        """A stored context; rows written before a field existed simply lack it."""
        raw: dict[str, Any] = json.loads(text) if text else {}
        about = raw.get("about")
        return cls(
            rule=int(raw.get("rule", 0)),
            turns=tuple(int(row) for row in raw.get("turns", ())),
            about=About(str(about.get("sender_name") or ""), float(about.get("created_at", 0)))
            if isinstance(about, dict) else None,
            image_problems=tuple(str(p) for p in raw.get("image_problems", ())),
            command=str(raw.get("command", "")),
            given=tuple((str(role), str(text)) for role, text in raw.get("given", ())),
            max_new_tokens=int(raw.get("max_new_tokens", 0)),
        )
