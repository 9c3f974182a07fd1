"""The history page at /admin: access, what it shows, escaping, thumbnails, purge; and in headless Chromium."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from browser import Browser
from PIL import Image

from core.images import sha256
from helpers import b64, png, post

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "admin-test-token-0123456789"
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


async def login(http: Any, url: str, token: str = TOKEN, target: str = "/admin") -> aiohttp.ClientResponse:
    return await http.post(f"{url}/admin/login", data={"token": token, "next": target}, allow_redirects=False)


async def test_the_history_page_shows_each_image_with_its_thread(daemon):
    # A browser's cookie jar: aiohttp's default one ignores cookies from IP-address hosts like 127.0.0.1.
    async with daemon(**ADMIN) as d, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await chat_with_two_images(http, d.url)
        async with http.get(f"{d.url}/admin", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/admin/login?next=/admin"  # no session
        async with http.get(f"{d.url}/admin/login") as resp:
            form = await resp.text()
        assert resp.status == 200 and 'method="post"' in form and 'name="token"' in form
        async with http.get(f"{d.url}/admin/thumbs/{sha256(RED)}") as resp:
            assert resp.status == 401
        async with await login(http, d.url, "wrong") as resp:
            assert resp.status == 401 and "Wrong token" in await resp.text()
        async with await login(http, d.url, target="//evil.example/x") as r:
            assert r.status == 303 and r.headers["Location"] == "/admin"  # never off-site
            assert "httponly" in r.headers["Set-Cookie"].lower() and "max-age=28800" in r.headers["Set-Cookie"].lower()
        async with http.get(f"{d.url}/admin") as resp:
            chats = await resp.text()
        async with http.get(f"{d.url}/admin/chats/api/ops") as resp:
            page, csp = await resp.text(), resp.headers["Content-Security-Policy"]
        async with http.get(f"{d.url}/admin/thumbs/{sha256(RED)}") as resp:
            thumb = Image.open(io.BytesIO(await resp.read()))
        async with http.get(f"{d.url}/admin/images/{sha256(RED)}") as resp:
            full, headers = await resp.read(), resp.headers
        async with http.get(f"{d.url}/admin/thumbs/..%2F..%2Fimsight.db") as resp:
            assert resp.status == 404
    assert 'href="/admin/chats/api/ops"' in chats
    assert "script-src" not in csp and "default-src 'none'" in csp  # no script runs, whatever a chat says
    red_at, blue_at = page.index(f"/admin/thumbs/{sha256(RED)}"), page.index(f"/admin/thumbs/{sha256(BLUE)}")
    assert red_at < page.index("Why is the build red?") < blue_at < page.index("and this one?")
    assert f'href="/admin/images/{sha256(RED)}"' in page  # the thumbnail opens the full image
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Cy &lt;b&gt;" in page and page.count('<span class="status">done</span>') == 2
    assert "(UTC" in page  # times say their zone
    assert thumb.format == "PNG" and max(thumb.size) <= 320
    assert full == RED and headers["Content-Type"] == "image/png"
    assert headers["Content-Disposition"].startswith("inline")


async def test_sessions_expire_log_out_and_forms_need_their_csrf_token(daemon):
    async with daemon(admin={**ADMIN["admin"], "session_hours": 0.0003}) as d, aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await chat_with_two_images(http, d.url)
        (await login(http, d.url)).release()
        async with http.get(f"{d.url}/admin/chats/api/ops") as resp:
            page = await resp.text()
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        async with http.post(f"{d.url}/admin/chats/api/ops/purge", data={"confirm": "yes"}) as resp:
            assert resp.status == 403  # a session alone is not enough: a form from elsewhere has no token
        async with http.post(f"{d.url}/admin/chats/api/ops/purge", data={"confirm": "yes", "csrf": csrf},
                             headers={"Origin": "http://evil.example"}) as resp:
            assert resp.status == 403
        async with http.post(f"{d.url}/admin/logout", data={"csrf": csrf}, allow_redirects=False) as resp:
            assert resp.status == 303
        async with http.get(f"{d.url}/admin", allow_redirects=False) as resp:
            assert resp.status == 303  # logged out
        (await login(http, d.url)).release()
        await asyncio.sleep(1.2)  # the session lasts ~1 s here
        async with http.get(f"{d.url}/admin", allow_redirects=False) as resp:
            assert resp.status == 303  # expired
        async with http.get(f"{d.url}/api/v1/history/api/ops") as resp:
            assert resp.status == 200  # nothing was purged


async def test_failed_logins_are_throttled(daemon, http):
    async with daemon(**ADMIN) as d:
        for _ in range(5):
            async with await login(http, d.url, "wrong") as resp:
                assert resp.status == 401
        async with await login(http, d.url) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "60"  # even the right token, for now


def test_short_admin_tokens_are_config_errors():
    from bot.config import parse
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"admin\.token: at least 16 characters"):
        parse({"admin": {"enabled": True, "token": "short"}}, environ={})


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


async def test_the_page_in_headless_chromium_logs_in_and_nothing_overflows(daemon, http, tmp_path):
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    async with daemon(**ADMIN) as d, Browser(tmp_path / "profile") as browser:
        await chat_with_two_images(http, d.url)
        long_word = "x" * 600  # an answer or stack trace without a space to break at
        await post(http, d.url, {"conversation_id": "ops", "text": f"what about {long_word}?", "reply_to": "i2",
                                 "wait": True})
        await browser.goto(f"{d.url}/admin/chats/api/ops")
        assert await browser.evaluate("location.pathname") == "/admin/login"  # sent to the form first
        await browser.screenshot(artifacts / "admin-login.png")
        await browser.submit(f"document.querySelector('input[name=token]').value = {TOKEN!r};"
                             "document.querySelector('form').submit()")
        assert await browser.evaluate("location.pathname") == "/admin/chats/api/ops"
        await browser.screenshot(artifacts / "admin-chat.png")
        drawn = await browser.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length")
        page_width = await browser.evaluate("document.documentElement.scrollWidth")
        viewport = await browser.evaluate("window.innerWidth")
        wider = await browser.evaluate(
            "[...document.querySelectorAll('.q, .answer, .thread, h1, td')]"
            ".filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.className || e.tagName)")
    assert drawn == 2  # both thumbnails were fetched with the session
    assert page_width <= viewport, (page_width, viewport)
    assert wider == []
    shot = Image.open(artifacts / "admin-chat.png").convert("RGB")
    colours = shot.getcolors(maxcolors=2**24) or []
    red = sum(n for n, (r, g, b) in colours if abs(r - 200) < 12 and abs(g - 30) < 12 and abs(b - 30) < 12)
    assert red > 5000, red
