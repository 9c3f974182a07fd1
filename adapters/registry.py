"""Every platform imsight speaks, by the name of its ``[adapters.<name>]`` section.

Adding a platform: its module (an ``Adapter`` and a ``PlatformSettings`` subclass), one line
here, its section in config.example.toml, its README section and its tests. The config loader,
the daemon, ``imsight doctor`` and log scrubbing find it here.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping

from pydantic import SecretStr

from adapters.base import PlatformSettings
from adapters.dingtalk import DingTalkSettings
from adapters.feishu import FeishuSettings
from adapters.openai_api import OpenAISettings
from adapters.slack import SlackSettings
from adapters.telegram import TelegramSettings
from adapters.webhook import WebhookSettings
from adapters.wecom import WeComSettings

__all__ = ["platforms", "register", "secret_fields", "unregister"]

_PLATFORMS: dict[str, type[PlatformSettings]] = {
    "webhook": WebhookSettings,  # the generic HTTP API
    "telegram": TelegramSettings,
    "feishu": FeishuSettings,
    "dingtalk": DingTalkSettings,
    "slack": SlackSettings,
    "wecom": WeComSettings,
    "openai": OpenAISettings,  # the OpenAI-compatible endpoint for other tools
}


def platforms() -> Mapping[str, type[PlatformSettings]]:
    """Section name -> settings class, in the order the daemon starts them."""
    return dict(_PLATFORMS)


def register(name: str, settings: type[PlatformSettings]) -> None:
    """Add a platform (a plugin, a test's fake one) before the config is read."""
    if not name.isidentifier() or name in _PLATFORMS:
        raise ValueError(f"platform name {name!r} is not an identifier, or taken")
    _PLATFORMS[name] = settings


def unregister(name: str) -> None:
    _PLATFORMS.pop(name, None)


def secret_fields(settings: type[PlatformSettings]) -> Iterator[str]:
    """The fields of a section that hold secrets: those typed ``SecretStr`` (or ``SecretStr | None``)."""
    for name, field in settings.model_fields.items():
        if SecretStr in (typing.get_args(field.annotation) or (field.annotation,)):
            yield name
