"""What an attacker on the same network tries, against running daemons on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from aiohttp import web
from fake_telegram import TOKEN, FakeTelegram

from helpers import answered, eventually, get, loopback, post

GROUP = {"id": -100555, "type": "supergroup", "title": "Ops"}
ANN = {"id": 5001, "is_bot": False, "first_name": "Ann"}


class Recorder:
    """An HTTP server on loopback that records what reaches it; ``hang`` makes it never answer."""

    def __init__(self, *, hang: bool = False, redirect_to: str | None = None) -> None:
        self.hits: list[str] = []
        self.hang, self.redirect_to = hang, redirect_to

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        if self.hang:
            await asyncio.sleep(8)  # longer than the daemon's callback timeout below
        if self.redirect_to:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        return web.Response(status=204)


async def _job(http: Any, url: str, job_id: str) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        _, job = await get(http, url, f"/api/v1/jobs/{job_id}")
        return job if job["status"] in ("done", "failed") else None

    return await eventually(ended)  # type: ignore[no-any-return]


async def test_callbacks_go_only_to_allowed_hosts(daemon, http):
    internal = Recorder()
    async with loopback(internal.app()) as internal_url:
        port = internal_url.rsplit(":", 1)[1]
        async with daemon(adapters={"webhook": {"allowed_callback_hosts": []}}) as d:
            status, body = await post(http, d.url, {"conversation_id": "c", "text": "hi?",
                                                    "callback_url": f"{internal_url}/latest/meta-data/"})
            assert (status, body["error"]["code"]) == (400, "callback_url_refused")
            assert "allowed_callback_hosts" in body["error"]["message"]
        async with daemon(adapters={"webhook": {"allowed_callback_hosts": ["hooks.example.com", "localhost",
                                                                           "169.254.169.254"]}}) as d:
            for target in (f"{internal_url}/admin", f"http://169.254.169.254:{port}/latest/meta-data/"):
                status, body = await post(http, d.url, {"conversation_id": "c", "text": "hi?", "callback_url": target})
                assert status == 400, (target, body)  # a host not listed; an address never reachable
            # Listed by name, but the name resolves to loopback: refused after resolving, detail only in the log.
            status, body = await post(http, d.url, {"conversation_id": "d", "text": "hi?",
                                                    "callback_url": f"http://localhost:{port}/admin"})
            assert status == 202
            delivery = await eventually(lambda: _delivery_error(d))
            job = await _job(http, d.url, body["job_id"])  # not retried: it cannot heal
    assert internal.hits == []
    assert delivery == "api: callback delivery failed"
    assert job["answer"]  # the answer is kept (GET /jobs has it); only its delivery failed


async def test_a_redirect_from_an_allowed_host_is_not_followed_and_the_caller_learns_nothing(daemon, http):
    internal = Recorder()
    async with loopback(internal.app()) as internal_url:
        bouncer = Recorder(redirect_to=f"{internal_url}/private")
        async with loopback(bouncer.app()) as bouncer_url, daemon() as d:
            _, _body = await post(http, d.url, {"conversation_id": "c", "text": "hi?",
                                               "callback_url": f"{bouncer_url}/hook"})
            await eventually(lambda: bouncer.hits)
            await asyncio.sleep(0.5)
            delivery = await eventually(lambda: _delivery_error(d))
    assert internal.hits == []
    assert delivery == "api: callback delivery failed"  # not "answered HTTP 307", not a host or port


async def _delivery_error(d: Any) -> str | None:
    import sqlite3

    with sqlite3.connect(d.config.storage.data_dir / "imsight.db") as db:
        row = db.execute("SELECT error FROM outbox WHERE error IS NOT NULL").fetchone()
    return row[0] if row else None


@pytest.fixture
async def fake_telegram() -> Any:
    server = FakeTelegram()
    async with loopback(server.app()) as url:
        server.url = url
        yield server


async def test_callbacks_that_hang_do_not_hold_up_another_platform(daemon, http, fake_telegram):
    hanging = Recorder(hang=True)
    telegram = {"enabled": True, "token": TOKEN, "base_url": f"{fake_telegram.url}/bot"}
    async with loopback(hanging.app()) as hook, daemon(
            adapters={"telegram": telegram, "webhook": {"fetch_timeout_seconds": 5}},
            server={"shutdown_grace_seconds": 1},
            limits={"max_queued_per_chat": 0, "questions_per_sender_per_minute": 0}) as d:
        for n in range(40):
            await post(http, d.url, {"conversation_id": f"slow{n}", "text": "hi?", "callback_url": f"{hook}/h{n}"})
        await eventually(lambda: len(hanging.hits) >= 16)  # every API sending slot is taken
        asked = time.monotonic()
        fake_telegram.push({"message_id": 1, "date": int(time.time()), "chat": {"id": 42, "type": "private",
                            "first_name": "Ann"}, "from": ANN, "text": "what is up?"})
        await answered(http, d.url, "telegram", "42", 1)
        took = time.monotonic() - asked
    assert took < 10, took  # answered at once, while 40 callbacks hang


async def test_api_credentials_read_only_what_came_through_the_api(daemon, http, fake_telegram):
    from helpers import ADMIN_TOKEN

    telegram = {"enabled": True, "token": TOKEN, "base_url": f"{fake_telegram.url}/bot"}
    api = {"Authorization": "Bearer api-token-1234567"}
    async with daemon(adapters={"telegram": telegram, "webhook": {"token": "api-token-1234567"}}) as d:
        fake_telegram.push({"message_id": 1, "date": int(time.time()), "chat": {"id": -100, "type": "group",
                            "title": "Ops"}, "from": ANN, "text": "private group talk"})
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        await eventually(lambda: _history_status(http, d.url, "telegram/-100", admin, 200))
        assert await _history_status(http, d.url, "telegram/-100", api, 403)
        assert await _history_status(http, d.url, "telegram/-100", {}, 401)
        _, _body = await post(http, d.url, {"conversation_id": "c", "text": "hi"}, headers=api)
        assert await _history_status(http, d.url, "api/c", api, 200)


async def _history_status(http: Any, url: str, path: str, headers: dict[str, str], expected: int) -> bool:
    async with http.get(f"{url}/api/v1/history/{path}", headers=headers) as resp:
        return resp.status == expected


async def test_a_web_page_cannot_drive_the_api(daemon, http, data_dir):
    from helpers import counts

    async with daemon() as d:
        port = d.url.rsplit(":", 1)[1]
        # DNS rebinding: the page's own name, now resolving to us.
        async with http.get(f"{d.url}/api/v1/history/api/c", headers={"Host": f"rebind.attacker.example:{port}"}
                            ) as resp:
            assert resp.status == 421
        # A cross-site form post.
        async with http.post(f"{d.url}/api/v1/messages", data={"conversation_id": "c", "text": "hi?"},
                             headers={"Origin": "https://attacker.example"}) as resp:
            assert resp.status == 403
        async with http.post(f"{d.url}/api/v1/messages", data={"conversation_id": "c", "text": "hi?"},
                             headers={"Origin": d.url}) as resp:
            assert resp.status == 202  # the same site is fine
    assert counts(data_dir)["jobs"] == 1  # only the same-site question


def test_an_open_api_on_a_reachable_address_must_be_asked_for():
    from bot.config import parse
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="open = true"):
        parse({"server": {"host": "0.0.0.0"}}, environ={})
    assert parse({"server": {"host": "0.0.0.0"}, "adapters": {"webhook": {"open": True}}}, environ={})
    assert parse({"server": {"host": "0.0.0.0"}}, environ={"IMSIGHT_WEBHOOK_TOKEN": "t" * 20})


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except (TimeoutError, ConnectionError):
        return False


async def test_half_sent_requests_are_closed_and_connections_are_capped(daemon, http, caplog):
    async with daemon(server={"header_timeout_seconds": 1, "max_connections": 30}) as d:
        host, port = "127.0.0.1", int(d.url.rsplit(":", 1)[1])
        slow = []
        for _ in range(20):  # slowloris: headers that never end
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: ")
            slow.append((reader, writer))
        closed = await asyncio.gather(*(_closed_within(r, 5) for r, _ in slow))
        idle = [await asyncio.open_connection(host, port) for _ in range(30)]
        extra = await asyncio.open_connection(host, port)  # the 31st: refused at once
        refused = await _closed_within(extra[0], 2)
        for _, w in [*slow, *idle, extra]:
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        await asyncio.sleep(0.2)
        status, _ = await get(http, d.url, "/healthz")
    assert all(closed) and refused
    assert "max_connections" in caplog.text
    assert status == 200


async def test_unauthenticated_bodies_are_refused_before_they_are_read(daemon):
    async with daemon(adapters={"webhook": {"token": "the-api-token-123"}}) as d:
        port = int(d.url.rsplit(":", 1)[1])
        for path, headers in (("/api/v1/messages", "Authorization: Bearer wrong\r\nContent-Type: application/json"),
                              ("/feishu/events", "Content-Type: application/json")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # 30 MB announced, not one byte of it sent: the answer must come anyway.
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n"
                         "Content-Length: 30000000\r\n\r\n".encode())
            status = (await asyncio.wait_for(reader.readline(), 5)).split()[1]
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            assert status in (b"401", b"404", b"413"), (path, status)


async def test_deep_json_is_a_400_not_a_500(daemon, http):
    deep = "[" * 100_000 + "]" * 100_000
    async with daemon() as d, http.post(f"{d.url}/api/v1/messages", data=deep,
                                        headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400


async def test_newlines_in_ids_cannot_forge_log_lines(daemon, http, caplog):
    caplog.set_level("INFO")
    async with daemon() as d:
        await post(http, d.url, {"conversation_id": "c1\n2026-11-30 00:00:00 INFO FORGED line", "text": ""})
    assert not any(line.lstrip().startswith("2026-11-30 00:00:00 INFO FORGED") for line in caplog.text.splitlines())
    assert "c1\\n2026-11-30" in caplog.text


async def test_a_sender_storing_images_is_held_to_the_rate(daemon, http):
    from helpers import b64, png

    async with daemon(limits={"questions_per_sender_per_minute": 3}) as d:
        statuses = []
        for n in range(5):
            status, _ = await post(http, d.url, {"conversation_id": "c", "sender": {"id": "bulk"},
                                                 "images": [{"data": b64(png((n, 9, 9)))}]})
            statuses.append(status)
    assert statuses == [200, 200, 200, 429, 429]


async def test_an_image_url_sent_in_pieces_is_read_to_its_end(daemon, http):
    import hashlib
    import io
    import random

    from PIL import Image

    rng = random.Random(3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (500, 480), rng.randbytes(500 * 480 * 3)).save(buffer, "PNG")
    image = buffer.getvalue()
    assert len(image) > 700_000

    async def pieces(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        for start in range(0, len(image), 64 * 1024):
            await resp.write(image[start:start + 64 * 1024])
            await asyncio.sleep(0.01)
        return resp

    app = web.Application()
    app.router.add_get("/shot.png", pieces)
    async with loopback(app) as url, daemon(adapters={"webhook": {"allowed_image_hosts": ["127.0.0.1"]}}) as d:
        status, body = await post(http, d.url, {"conversation_id": "c", "images": [{"url": f"{url}/shot.png"}]})
    assert (status, body["images"]) == (200, [hashlib.sha256(image).hexdigest()])
