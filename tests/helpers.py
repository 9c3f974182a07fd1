"""Helpers for tests: images, HTTP calls, row counts of a data dir, and the SDPA calls a forward makes."""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import random
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image
from standardwebhooks.webhooks import Webhook

from bot.store import JobRecord, Store


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def free_port() -> int:
    """A port nothing listens on (until something is started there), below the ephemeral range: a daemon
    restarted on it (the kill -9 tests) must not find it taken meanwhile as some outgoing connection's
    local port (a restart once failed with "address already in use" on a port from that range)."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    for _ in range(200):
        port = random.randint(min(20000, ephemeral_low - 1000), ephemeral_low - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def counts(data_dir: Path) -> dict[str, int]:
    """Rows per table and image files on disk: what 'changes nothing' is checked against."""
    db = data_dir / "imsight.db"
    result = {}
    with sqlite3.connect(db) as conn:
        for table in ("images", "messages", "message_images", "inbox", "jobs", "job_images", "outbox"):
            result[table] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    result["files"] = sum(1 for p in (data_dir / "images").rglob("*") if p.is_file()) if (
        data_dir / "images").exists() else 0
    return result


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any], **kwargs: Any) -> tuple[int, Any]:
    async with http.post(f"{url}/api/v1/messages", json=body, **kwargs) as resp:
        return resp.status, await resp.json()


ADMIN_TOKEN = "test-admin-token-0123456789"  # conftest's configs carry it


async def get(http: aiohttp.ClientSession, url: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    if path.startswith("/api/v1/history/") and not path.startswith("/api/v1/history/api/"):
        # Another platform's chats: the API's own credentials do not reach them, the admin token does.
        kwargs.setdefault("headers", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    async with http.get(f"{url}{path}", **kwargs) as resp:
        return resp.status, await resp.json()


def signed_headers(secret: str, msg_id: str, body: bytes, *, age_s: float = 0) -> dict[str, str]:
    """Standard Webhooks headers made by the reference implementation, not by our code."""
    now = datetime.fromtimestamp(int(time.time() - age_s), tz=UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body.decode()),
        "Content-Type": "application/json",
    }


@asynccontextmanager
async def loopback(app: web.Application, port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port unless given) for the duration of the block; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)  # fake platforms' URLs may hold test tokens
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def bot_answers(http: aiohttp.ClientSession, url: str, platform: str, chat_id: str) -> list[dict[str, Any]]:
    """The bot's answers in a chat as the history API shows them (stored once delivered), oldest first."""
    status, body = await get(http, url, f"/api/v1/history/{platform}/{chat_id}")
    assert status in (200, 404), body  # 404: nothing stored for the chat yet
    return [m for m in body.get("messages", ()) if m["role"] == "bot"]


async def answered(http: aiohttp.ClientSession, url: str, platform: str, chat_id: str, count: int
                   ) -> list[dict[str, Any]]:
    """The chat's answers once there are at least ``count`` of them."""
    async def enough() -> list[dict[str, Any]] | None:
        done = await bot_answers(http, url, platform, chat_id)
        return done if len(done) >= count else None

    return await eventually(enough)  # type: ignore[no-any-return]


async def eventually(check: Any, timeout_s: float = 30, step_s: float = 0.02) -> Any:
    """Poll ``check()`` (sync or async) until it returns something truthy; fail after ``timeout_s``."""
    for _ in range(int(timeout_s / step_s)):
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(step_s)
    raise AssertionError(f"not true within {timeout_s}s: {check}")


async def answer_and_send(store: Store, job: JobRecord, text: str, message_id: str) -> None:
    """What a worker and the outbox record for a job whose reply the platform accepted as ``message_id``."""
    await store.answered(job, text)
    (reply,) = [r for r in await store.due_replies(1000) if r.job.id == job.id]
    await store.reply_sent(reply, message_id)


async def connections_opened(server: Any, count: int) -> None:
    """Until a fake platform's client has opened ``count`` connections (``server.connections``) and the
    last (``server.socket``) is open."""
    for _ in range(1000):
        if server.connections >= count and server.socket is not None and not server.socket.closed:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.connections} connections opened, {count} expected")


def recorded(owner: Any, name: str, what: Any) -> list[Any]:
    """``owner.name`` replaced by a wrapper that calls it as before and first appends ``what(*args, **kwargs)`` to the
    list returned: what a test learns of each call (the interpreted scripts spy on imsight's kernels this way)."""
    calls: list[Any] = []
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(what(*args, **kwargs))
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)
    return calls


def bare_generate(engine: Any, images: list[Any], question: str, tokens: int, turns: Any = ()) -> str:
    """What a plain ``model.generate()`` answers, greedy, for the same prompt."""
    import torch

    inputs = engine._inputs(images, list(turns), question)
    with torch.inference_mode():
        out = engine.loaded.model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = engine._eos
    shown = [t for t in new if t not in engine._hidden_ids]
    if any(t in eos for t in new):
        shown = shown[:next(i for i, t in enumerate(shown) if t in eos)]
    return engine.loaded.processor.tokenizer.decode(shown, skip_special_tokens=False)


@contextmanager
def sdpa_calls() -> Iterator[list[tuple[int, int, int, bool, bool]]]:
    """Each call of torch's SDPA meanwhile: rows, query tokens, key positions, whether it had a mask,
    whether causal."""
    import torch

    calls: list[tuple[int, int, int, bool, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query: Any, key: Any, value: Any, attn_mask: Any = None, *args: Any, is_causal: bool = False,
            **kwargs: Any) -> Any:
        calls.append((query.shape[0], query.shape[2], key.shape[2], attn_mask is not None, is_causal))
        return sdpa(query, key, value, attn_mask, *args, is_causal=is_causal, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def tiny_glm(*, int4: bool = True) -> Any:
    """The benches' tiny GLM-4.1V shape in memory (``bench/glm_model.py``: random weights, float32, no processor),
    its language model's linears in int4 unless ``int4=False``."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from glm_model import tiny_glm as build

    from core import int4_weights

    model = build()
    if int4:
        int4_weights.quantize_linears(model, ["model.visual", "lm_head"])
    return model
