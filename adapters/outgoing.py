"""What the bot posts is defanged first: no mass mention and no remote image, whoever wrote it.

Answers carry text from people (nicknames, an echoed ``/use <at user_id="all"></at>``) and from
the model, which repeats what it reads in a screenshot. A zero-width space inside the syntax keeps
it readable and stops every platform from acting on it.
"""

from __future__ import annotations

import re

__all__ = ["defanged"]

_ZWSP = "\u200b"
# Feishu <at user_id="all"> (and any <at ...>), Slack <!channel>/<!here>/<!everyone>/<@U123>.
_TAGS = re.compile(r"<(?=\s*(?:at\b|!|@))", re.IGNORECASE)
# @all, @everyone, @here, @channel, @所有人 as words: chat clients turn them into mass notifications.
_MASS = re.compile(r"@(?=(?:all|everyone|here|channel|所有人)\b)", re.IGNORECASE)
# Markdown images load their URL in every reader's client (a tracking pixel, an internal URL).
_IMAGE = re.compile(r"!\[([^\]\n]*)\]\(([^)\s]*)[^)]*\)")


def defanged(text: str) -> str:
    text = _TAGS.sub("<" + _ZWSP, text)
    text = _MASS.sub("@" + _ZWSP, text)
    return _IMAGE.sub(lambda m: f"[image: {m.group(1) or 'untitled'}] ({m.group(2)})", text)
