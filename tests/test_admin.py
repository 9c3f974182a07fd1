"""The history page at /admin: access, what it shows, escaping, thumbnails, purge; and in headless Chromium."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from core.images import sha256
from helpers import b64, png, post

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "admin-test-token"
RED, BLUE = png((200, 30, 30), (160, 120)), png((20, 30, 200), (120, 160))
ADMIN = {"admin": {"enabled": True, "token": TOKEN}}


async def chat_with_two_images(http: Any, url: str) -> None:
    await post(http, url, {"conversation_id": "ops", "images": [{"data": b64(RED)}], "message_id": "i1",
                           "sender": {"id": "ann", "name": "Ann"}})
    await post(http, url, {"conversation_id": "ops", "text": "Why is the build red?", "reply_to": "i1", "wait": True,
                           "sender": {"id": "bo", "name": "Bo"}})
    await post(http, url, {"conversation_id": "ops", "images": [{"data": b64(BLUE)}], "message_id": "i2",
                           "sender": {"id": "ann", "name": "Ann"}})
    await post(http, url, {"conversation_id": "ops", "text": "<script>alert(1)</script> and this one?",
                           "reply_to": "i2", "wait": True, "sender": {"id": "cy", "name": "Cy <b>"}})


async def test_the_history_page_shows_each_image_with_its_thread(daemon):
    # A browser's cookie jar: aiohttp's default one ignores cookies from IP-address hosts like 127.0.0.1.
    async with daemon(**ADMIN) as d, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await chat_with_two_images(http, d.url)
        async with http.get(f"{d.url}/admin") as resp:
            assert resp.status == 401  # no session
        async with http.get(f"{d.url}/admin/login?token=wrong") as resp:
            assert resp.status == 401
        async with http.get(f"{d.url}/admin/login?token={TOKEN}&next=//evil.example/x", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/admin"  # never off-site
        async with http.get(f"{d.url}/admin/login?token={TOKEN}") as resp:  # follows to /admin, cookie set
            chats = await resp.text()
        async with http.get(f"{d.url}/admin/chats/api/ops") as resp:
            page, csp = await resp.text(), resp.headers["Content-Security-Policy"]
        async with http.get(f"{d.url}/admin/thumbs/{sha256(RED)}") as resp:
            thumb = Image.open(io.BytesIO(await resp.read()))
        async with http.get(f"{d.url}/admin/thumbs/..%2F..%2Fimsight.db") as resp:
            assert resp.status == 404
    assert 'href="/admin/chats/api/ops"' in chats
    assert "script-src" not in csp and "default-src 'none'" in csp  # no script runs, whatever a chat says
    red_at, blue_at = page.index(f"/admin/thumbs/{sha256(RED)}"), page.index(f"/admin/thumbs/{sha256(BLUE)}")
    assert red_at < page.index("Why is the build red?") < blue_at < page.index("and this one?")
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Cy &lt;b&gt;" in page and page.count('<span class="status">done</span>') == 2
    assert thumb.format == "PNG" and max(thumb.size) <= 320


async def test_purge_asks_first_then_deletes_the_chat(daemon, http):
    async with daemon(**ADMIN) as d:
        await chat_with_two_images(http, d.url)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with http.post(f"{d.url}/admin/chats/api/ops/purge", headers=auth) as resp:
            asked = await resp.text()
        async with http.get(f"{d.url}/api/v1/history/api/ops") as resp:
            assert resp.status == 200  # asking deleted nothing
        async with http.post(f"{d.url}/admin/chats/api/ops/purge", data={"confirm": "yes"}, headers=auth) as resp:
            done = await resp.text()
        async with http.get(f"{d.url}/admin/chats/api/ops", headers=auth) as resp:
            assert resp.status == 404
    assert "Yes, purge it" in asked and "message(s) of api chat ops deleted" in done


def _chromium() -> str:
    """Debian's chromium; installed with apt when missing (as root), else the test is skipped, saying why."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True,
                       timeout=600, check=False)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and could not be installed here (apt-get install chromium)")
    return found


async def test_the_page_renders_in_headless_chromium(daemon, http, tmp_path):
    browser = _chromium()
    artifact = ROOT / "test-artifacts" / "admin-chat.png"
    artifact.parent.mkdir(exist_ok=True)
    artifact.unlink(missing_ok=True)
    async with daemon(**ADMIN) as d:
        await chat_with_two_images(http, d.url)
        url = f"{d.url}/admin/login?token={TOKEN}&next=/admin/chats/api/ops"
        proc = await asyncio.create_subprocess_exec(
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1100",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", f"--screenshot={artifact}", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert artifact.is_file(), err.decode(errors="replace")[-2000:]
    shot = Image.open(artifact).convert("RGB")
    colours = shot.getcolors(maxcolors=2**24) or []
    red = sum(n for n, (r, g, b) in colours if abs(r - 200) < 12 and abs(g - 30) < 12 and abs(b - 30) < 12)
    blue = sum(n for n, (r, g, b) in colours if abs(r - 20) < 12 and abs(g - 30) < 12 and abs(b - 200) < 12)
    assert red > 5000 and blue > 5000, (red, blue)  # both thumbnails were fetched and drawn, with the session
