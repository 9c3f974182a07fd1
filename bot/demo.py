"""``imsight demo``: the whole daemon on a tiny test model, driven over its own HTTP API."""

from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image, ImageDraw

from bot.config import Config, parse
from bot.daemon import Daemon
from core.tiny_model import build_tiny_model

__all__ = ["demo", "screenshot_png"]


def screenshot_png(title: str = "Build #1432 failed", color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A small generated 'screenshot' of a failed CI build."""
    image = Image.new("RGB", (480, 270), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 480, 40), fill=color)
    draw.text((12, 12), title, fill=(255, 255, 255))
    for n, line in enumerate(["$ make test", "tests/test_api.py::test_upload FAILED", "1 failed, 41 passed"]):
        draw.text((12, 60 + 24 * n), line, fill=(30, 30, 30))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


async def demo() -> int:
    with tempfile.TemporaryDirectory(prefix="imsight-demo-") as tmp:
        root = Path(tmp)
        print(f"building a tiny random test model in {root / 'model'} (its answers are noise) ...")
        build_tiny_model(root / "model")
        config: Config = parse({
            "server": {"port": 0},
            "storage": {"data_dir": str(root / "data")},
            "engine": {"model_path": str(root / "model"), "max_new_tokens": 24},
        })
        async with Daemon(config) as daemon, aiohttp.ClientSession() as http:
            print(f"daemon listening on {daemon.url}")
            png = screenshot_png()
            first = await _post(http, daemon.url, {
                "conversation_id": "demo", "sender": {"id": "ann", "name": "Ann"},
                "text": "Why did this build fail?", "wait": True,
                "images": [{"data": base64.b64encode(png).decode()}],
            })
            _show("question with a screenshot", first)
            follow_up = await _post(http, daemon.url, {
                "conversation_id": "demo", "sender": {"id": "bob", "name": "Bob"},
                "text": "And how do I fix it?", "wait": True,
            })
            _show("follow-up without an image", follow_up)
            same = first["images"] == follow_up["images"]
            print(f"\nthe follow-up was answered about the same screenshot: {'yes' if same else 'NO'}")
        return 0 if same else 1


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(f"{url}/api/v1/messages", json=body) as resp:
        payload: dict[str, Any] = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"the daemon answered {resp.status}: {payload}")
        return payload


def _show(what: str, reply: dict[str, Any]) -> None:
    print(f"\n{what}:")
    print(f"  job {reply['job_id']} {reply['status']}, images used: {[s[:12] for s in reply['images']]}")
    print(f"  answer: {reply['answer']!r}")
