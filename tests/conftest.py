"""Shared fixtures: the tiny real model, configs on temporary data dirs, a running daemon, images."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.config import Config, parse
from bot.daemon import Daemon
from core.engine import Engine
from core.model_files import resolve
from core.tiny_model import build_tiny_model
from core.transformers_engine import TransformersEngine
from helpers import ADMIN_TOKEN


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def make_config(data_dir: Path, tiny_model: Path) -> Callable[..., Config]:
    def make(**sections: Any) -> Config:
        raw = {
            "server": {"port": 0, "shutdown_grace_seconds": 10},
            "storage": {"data_dir": str(data_dir)},
            "engine": {"model_path": str(tiny_model), "max_new_tokens": 8},
            "admin": {"token": ADMIN_TOKEN},  # the page stays off; the token reads other platforms' history
            # Callbacks go to recorder servers the tests start on loopback.
            "adapters": {"webhook": {"wait_seconds": 30, "allowed_callback_hosts": ["127.0.0.1"]}},
        }
        return parse(_merge(raw, sections), environ={})

    return make


@pytest.fixture
def daemon(make_config: Callable[..., Config]) -> Callable[..., Any]:
    """``async with daemon(**config_sections) as d:`` runs a whole daemon on loopback."""

    @asynccontextmanager
    async def run(**sections: Any) -> AsyncIterator[Daemon]:
        async with Daemon(make_config(**sections)) as d:
            yield d

    return run


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def started() -> AsyncIterator[Callable[[Any], Any]]:
    """``await started(engine)`` starts an engine and stops it when the test ends."""
    running: list[Engine] = []

    async def start(engine: Any) -> Any:
        await engine.start()
        running.append(engine)
        return engine

    yield start
    for engine in running:
        await engine.stop()


@pytest.fixture
def make_engine(tiny_model: Path, started: Callable[[Any], Any]) -> Callable[..., Any]:
    """``await make_engine(**options)``: a started transformers engine on the tiny model, on the CPU."""

    async def make(**options: Any) -> TransformersEngine:
        engine = TransformersEngine(resolve("x", tiny_model, allow_download=False), device="cpu", **options)
        return await started(engine)  # type: ignore[no-any-return]

    return make
