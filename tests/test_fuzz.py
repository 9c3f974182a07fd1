"""Property-based fuzzing (hypothesis) of every HTTP entry point of one running daemon.

For any input: no 5xx, the daemon keeps answering, a refused request (4xx) writes no row and no
file, and nothing is ever written outside the data dir. The daemon and the fake platforms run on
a loop in a background thread; hypothesis drives plain blocking HTTP requests at them. Bounded:
a fixed number of examples per entry point, no shrinking database.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fake_dingtalk import APP_KEY, APP_SECRET, FakeDingTalk
from fake_feishu import APP_ID, ENCRYPT_KEY, VERIFICATION_TOKEN, FakeFeishu, sealed
from fake_feishu import APP_SECRET as FEISHU_SECRET
from fake_telegram import TOKEN, FakeTelegram
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.dingtalk import sign
from bot.config import config_model
from bot.daemon import Daemon
from helpers import loopback, png

T = TypeVar("T")

API_TOKEN = "fuzz-api-token"
TG_SECRET = "fuzz-secret-token"
FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Background:
    """An event loop in a thread, running the daemon and the fake platforms for the whole module."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Served:
    def __init__(self, daemon: Daemon, data_dir: Path) -> None:
        self.port = daemon.web.port if daemon.web else 0
        self.data_dir = data_dir

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def intake_settled(self) -> None:
        """Wait for events taken in the background (downloads) to be stored, so counts are stable."""
        for _ in range(200):
            with sqlite3.connect(self.data_dir / "imsight.db") as db:
                if not db.execute("SELECT count(*) FROM inbox WHERE processed_at IS NULL").fetchone()[0]:
                    return
            time.sleep(0.01)

    def written(self) -> dict[str, int]:
        """What intake writes: answers (bot messages, outbox) come later and are not counted."""
        with sqlite3.connect(self.data_dir / "imsight.db") as db:
            rows = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for t in ("inbox", "images", "jobs", "job_images", "message_images")}
            rows["user_messages"] = db.execute("SELECT count(*) FROM messages WHERE role = 'user'").fetchone()[0]
        rows["files"] = sum(1 for p in (self.data_dir / "images").rglob("*") if p.is_file()) if (
            self.data_dir / "images").exists() else 0
        return rows

    def check(self, send: Callable[[], tuple[int, bytes]]) -> int:
        """Send; assert no 5xx, and nothing written when refused. Returns the status."""
        self.intake_settled()
        before = self.written()
        status, body = send()
        assert status < 500, (status, body[:300])
        if status >= 400:
            assert json.loads(body)["error"]["code"]  # refusals are JSON with a code
            assert self.written() == before, (status, body[:300])
        return status


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("fuzz")
    data_dir = root / "data"
    background = Background()
    stack = AsyncExitStack()
    telegram, feishu, dingtalk = FakeTelegram(), FakeFeishu(), FakeDingTalk()
    telegram.add_file("photo-1", png())
    dingtalk.pictures["dlc-1"] = png((1, 2, 3))

    async def start() -> Daemon:
        telegram.url = await stack.enter_async_context(loopback(telegram.app()))
        feishu.url = await stack.enter_async_context(loopback(feishu.app()))
        dingtalk.url = await stack.enter_async_context(loopback(dingtalk.app()))
        config = config_model().model_validate({
            "server": {"port": 0, "max_body_mb": 1},
            "storage": {"data_dir": str(data_dir)},
            "engine": {"model_path": str(tiny_model), "max_new_tokens": 4, "warmup": False},
            "limits": {"questions_per_sender_per_minute": 0, "max_queued_per_chat": 0},
            "adapters": {
                "webhook": {"token": API_TOKEN, "secret": "whsec_" + base64.b64encode(b"k" * 24).decode()},
                "telegram": {"enabled": True, "token": TOKEN, "base_url": f"{telegram.url}/bot", "mode": "webhook",
                             "webhook_url": "https://bot.example.com/telegram/webhook", "secret_token": TG_SECRET},
                "feishu": {"enabled": True, "app_id": APP_ID, "app_secret": FEISHU_SECRET,
                           "verification_token": VERIFICATION_TOKEN, "encrypt_key": ENCRYPT_KEY,
                           "base_url": feishu.url},
                "dingtalk": {"enabled": True, "app_key": APP_KEY, "app_secret": APP_SECRET, "base_url": dingtalk.url,
                             "legacy_base_url": dingtalk.url},
            },
        })
        return await stack.enter_async_context(Daemon(config))

    daemon = background.run(start(), timeout_s=120)
    try:
        yield Served(daemon, data_dir)
        outside = [p for p in root.rglob("*") if not p.is_relative_to(data_dir) and p != data_dir]
        assert outside == [], outside  # path-like ids never became paths
    finally:
        background.run(stack.aclose(), timeout_s=60)
        background.close()


# ---- strategies ---------------------------------------------------------------------------

NASTY_TEXT = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["../../etc/passwd", "..\\..\\boot.ini", "/etc/shadow", "", " ", "\x00", "a\x00b", "\u202e",
                     "\ud7ff\ue000", "😀" * 30, "%2e%2e%2f", "NUL", "con", "x" * 300, "\n\r\t"]),
)
IMAGE_BYTES = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([
        png(),
        png()[:40],  # truncated
        b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
        b"GIF89a" + b"\x00" * 20,
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 30,
    ]),
)
JSONISH: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | NASTY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NASTY_TEXT, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def api_message(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key in ("conversation_id", "message_id", "reply_to", "thread_id", "text"):
        if draw(st.booleans()):
            body[key] = draw(NASTY_TEXT | JSONISH)
    if draw(st.booleans()):
        body["images"] = draw(st.lists(st.one_of(
            IMAGE_BYTES.map(lambda b: {"data": base64.b64encode(b).decode()}),
            st.fixed_dictionaries({"data": NASTY_TEXT}),
            st.fixed_dictionaries({"url": NASTY_TEXT}),
            JSONISH,
        ), max_size=3))
    if draw(st.booleans()):
        body["sender"] = draw(st.fixed_dictionaries({"id": NASTY_TEXT, "name": NASTY_TEXT}) | JSONISH)
    if draw(st.booleans()):
        body[draw(NASTY_TEXT)] = draw(JSONISH)
    return body


# ---- the entry points -------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}


@FUZZ
@given(body=api_message())
def test_api_messages_json(served: Served, body: dict[str, Any]) -> None:
    served.check(lambda: served.request("POST", "/api/v1/messages", json.dumps(body).encode(), AUTH))


@FUZZ
@given(body=st.binary(max_size=400), content_type=st.sampled_from(
    ["application/json", "multipart/form-data; boundary=b", "multipart/form-data", "text/plain", "image/png", ""]),
    token=st.sampled_from([API_TOKEN, "wrong", ""]))
def test_api_messages_raw_bytes(served: Served, body: bytes, content_type: str, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    served.check(lambda: served.request("POST", "/api/v1/messages", body, headers))


@FUZZ
@given(parts=st.lists(st.tuples(NASTY_TEXT, NASTY_TEXT, IMAGE_BYTES | NASTY_TEXT.map(str.encode)), max_size=3))
def test_api_messages_multipart(served: Served, parts: list[tuple[str, str, bytes]]) -> None:
    boundary = "fuzzboundary42"
    chunks = []
    for name, filename, data in parts:
        safe = name.replace('"', "").replace("\r", "").replace("\n", "")
        file = filename.replace('"', "").replace("\r", "").replace("\n", "")
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{safe}"; filename="{file}"\r\n'
                      f"Content-Type: image/png\r\n\r\n".encode("utf-8", "replace") + data + b"\r\n")
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    headers = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
    served.check(lambda: served.request("POST", "/api/v1/messages", body, headers))


@FUZZ
@given(job=NASTY_TEXT, platform=NASTY_TEXT, chat=NASTY_TEXT, limit=NASTY_TEXT)
def test_api_reads(served: Served, job: str, platform: str, chat: str, limit: str) -> None:
    from urllib.parse import quote

    q = lambda s: quote(s, safe="") or "x"  # noqa: E731
    served.check(lambda: served.request("GET", f"/api/v1/jobs/{q(job)}", headers=AUTH))
    served.check(lambda: served.request("GET", f"/api/v1/history/{q(platform)}/{q(chat)}?limit={q(limit)}",
                                        headers=AUTH))


@FUZZ
@given(body=st.dictionaries(NASTY_TEXT, JSONISH, max_size=4)
       | st.fixed_dictionaries({"update_id": st.integers(), "message": JSONISH}),
       secret=st.sampled_from([TG_SECRET, TG_SECRET, "wrong", ""]))
def test_telegram_webhook(served: Served, body: dict[str, Any], secret: str) -> None:
    headers = {"X-Telegram-Bot-Api-Secret-Token": secret, "Content-Type": "application/json"}
    served.check(lambda: served.request("POST", "/telegram/webhook", json.dumps(body).encode(), headers))


@FUZZ
@given(message=st.fixed_dictionaries({
    "message_id": st.integers(-5, 10**12), "date": st.integers(0, 2**31),
    "chat": st.fixed_dictionaries({"id": st.integers(-(10**13), 10**13), "type": st.sampled_from(
        ["private", "group", "supergroup", "channel", "weird"])}),
}, optional={"text": NASTY_TEXT, "caption": NASTY_TEXT, "from": st.fixed_dictionaries(
    {"id": st.integers(1, 10**10), "is_bot": st.booleans(), "first_name": NASTY_TEXT}),
    "photo": st.lists(st.fixed_dictionaries({"file_id": st.sampled_from(["photo-1", "missing"]),
                                             "file_unique_id": NASTY_TEXT, "width": st.integers(0, 10**6),
                                             "height": st.integers(0, 10**6)}), max_size=2),
    "message_thread_id": st.integers(-5, 10**6), "reply_to_message": JSONISH}),
    update_id=st.integers(0, 2**40))
def test_telegram_webhook_message_shaped(served: Served, message: dict[str, Any], update_id: int) -> None:
    headers = {"X-Telegram-Bot-Api-Secret-Token": TG_SECRET, "Content-Type": "application/json"}
    body = json.dumps({"update_id": update_id, "message": message}).encode()
    served.check(lambda: served.request("POST", "/telegram/webhook", body, headers))


@FUZZ
@given(payload=JSONISH, seal=st.booleans(), garbage=st.binary(max_size=200))
def test_feishu_callback(served: Served, payload: Any, seal: bool, garbage: bytes) -> None:
    if seal and isinstance(payload, dict):
        body, headers = sealed(payload)  # a correctly sealed event whose content is arbitrary
    elif seal:
        body, headers = garbage, {"Content-Type": "application/json"}
    else:
        body, headers = json.dumps(payload).encode(), {"Content-Type": "application/json"}
    served.check(lambda: served.request("POST", "/feishu/events", body, headers))


@FUZZ
@given(event=st.fixed_dictionaries({
    "schema": st.just("2.0"),
    "header": st.fixed_dictionaries({"event_id": NASTY_TEXT, "event_type": st.sampled_from(
        ["im.message.receive_v1", "other"]), "token": st.just(VERIFICATION_TOKEN), "app_id": st.just(APP_ID)}),
    "event": st.fixed_dictionaries({"sender": JSONISH, "message": st.fixed_dictionaries({
        "message_id": NASTY_TEXT, "chat_id": NASTY_TEXT, "chat_type": st.sampled_from(["group", "p2p", "x"]),
        "message_type": st.sampled_from(["text", "image", "post", "file"]), "content": NASTY_TEXT | JSONISH.map(
            json.dumps)}, optional={"mentions": JSONISH, "parent_id": NASTY_TEXT})})}))
def test_feishu_callback_event_shaped(served: Served, event: dict[str, Any]) -> None:
    body, headers = sealed(event)
    served.check(lambda: served.request("POST", "/feishu/events", body, headers))


@FUZZ
@given(payload=JSONISH | st.fixed_dictionaries({
    "msgId": NASTY_TEXT, "conversationId": NASTY_TEXT, "conversationType": st.sampled_from(["1", "2", "3"]),
    "senderStaffId": NASTY_TEXT, "senderNick": NASTY_TEXT, "isInAtList": st.booleans(),
    "msgtype": st.sampled_from(["text", "picture", "richText", "file"]), "text": JSONISH, "content": JSONISH,
    "sessionWebhook": NASTY_TEXT, "sessionWebhookExpiredTime": st.integers()}),
    signed=st.sampled_from(["good", "good", "bad", "old", "none"]))
def test_dingtalk_callback(served: Served, payload: Any, signed: str) -> None:
    now = int(time.time() * 1000)
    stamp = str(now - 2 * 3_600_000 if signed == "old" else now)
    headers = {"Content-Type": "application/json"}
    if signed != "none":
        headers |= {"timestamp": stamp, "sign": sign(stamp, APP_SECRET if signed != "bad" else "nope")}
    served.check(lambda: served.request("POST", "/dingtalk/events", json.dumps(payload).encode(), headers))


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(served: Served) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    try:
        conn.putrequest("POST", "/api/v1/messages")
        conn.putheader("Authorization", f"Bearer {API_TOKEN}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(50 * 2**20))  # 50 MB declared; 1 MB allowed
        conn.endheaders()
        conn.send(os.urandom(1024))  # the rest never comes: the answer must not wait for it
        resp = conn.getresponse()
        assert resp.status == 413
    finally:
        conn.close()
    stamp = str(int(time.time() * 1000))
    credentials = {"/telegram/webhook": {"X-Telegram-Bot-Api-Secret-Token": TG_SECRET}, "/feishu/events": {},
                   "/dingtalk/events": {"timestamp": stamp, "sign": sign(stamp, APP_SECRET)}}
    for path, headers in credentials.items():
        status, _ = served.request("POST", path, b"x" * (2 * 2**20), {"Content-Type": "application/json", **headers})
        assert status == 413, path


def test_the_daemon_still_answers_after_the_fuzzing(served: Served) -> None:
    status, body = served.request("POST", "/api/v1/messages", json.dumps({
        "conversation_id": "after-fuzz", "text": "still there?", "wait": True,
        "images": [{"data": base64.b64encode(png()).decode()}]}).encode(), AUTH)
    assert status == 200 and json.loads(body)["status"] == "done", body
