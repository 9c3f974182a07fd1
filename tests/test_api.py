"""The generic HTTP API end to end: real daemon on loopback, real SQLite file, the tiny real model."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from standardwebhooks.webhooks import Webhook

from core.images import sha256
from helpers import b64, counts, eventually, get, png, post, signed_headers

RED, BLUE = png((200, 30, 30)), png((30, 30, 200))


async def test_image_and_question_get_an_answer_about_that_image(daemon, http):
    async with daemon() as d:
        status, body = await post(http, d.url, {
            "conversation_id": "c1", "text": "What is this?", "wait": True, "images": [{"data": b64(RED)}],
        })
    assert status == 200, body
    assert body["status"] == "done"
    assert body["images"] == [sha256(RED)]
    assert isinstance(body["answer"], str) and body["answer"]
    assert body["message_id"]


async def test_a_message_that_reaches_a_stopping_daemon_is_a_503_to_send_again(daemon, http, data_dir):
    async with daemon() as d:
        d.dispatcher.close_intake()  # stopping's first step, which a request still in flight can meet
        before = counts(data_dir)
        status, body = await post(http, d.url, {
            "conversation_id": "c1", "text": "What is this?", "wait": True, "images": [{"data": b64(RED)}],
        })
    assert status == 503, body
    assert body["error"]["code"] == "shutting_down"
    assert counts(data_dir) == before  # nothing half-taken in: the sender delivers it again


async def test_follow_up_without_image_uses_the_first_image(daemon, http):
    async with daemon() as d:
        _, first = await post(http, d.url, {
            "conversation_id": "c1", "text": "What is this?", "wait": True, "images": [{"data": b64(RED)}],
        })
        status, follow = await post(http, d.url, {"conversation_id": "c1", "text": "And why?", "wait": True})
        assert status == 200
        assert follow["images"] == first["images"] == [sha256(RED)]
        # The answer says which image it is about, since the question carried none.
        assert follow["answer"].startswith("About the image")
        # The earlier question and answer went along as history: visible in the job's turns.
        _, history = await get(http, d.url, "/api/v1/history/api/c1")
    roles = [(m["role"], m["text"]) for m in history["messages"]]
    assert roles[0] == ("user", "What is this?")
    assert roles[1][0] == "bot"
    assert roles[2] == ("user", "And why?")
    assert history["messages"][3]["used_images"] == [sha256(RED)]
    assert history["messages"][3]["answers"] == history["messages"][2]["message_id"]


async def test_image_without_text_is_stored_and_used_by_a_later_question(daemon, http):
    async with daemon() as d:
        status, stored = await post(http, d.url, {"conversation_id": "c1", "images": [{"data": b64(BLUE)}]})
        assert (status, stored["status"], stored["images"]) == (200, "stored", [sha256(BLUE)])
        _, answer = await post(http, d.url, {"conversation_id": "c1", "text": "What colour?", "wait": True})
    assert answer["images"] == [sha256(BLUE)]


async def test_reply_to_an_older_image_message_uses_that_image(daemon, http):
    async with daemon() as d:
        await post(http, d.url, {"conversation_id": "c1", "message_id": "old", "images": [{"data": b64(RED)}]})
        await post(http, d.url, {"conversation_id": "c1", "message_id": "new", "images": [{"data": b64(BLUE)}]})
        _, latest = await post(http, d.url, {"conversation_id": "c1", "text": "This one?", "wait": True})
        _, replied = await post(http, d.url, {
            "conversation_id": "c1", "reply_to": "old", "text": "And that one?", "wait": True,
        })
    assert latest["images"] == [sha256(BLUE)]
    assert replied["images"] == [sha256(RED)]


async def test_two_conversations_never_see_each_others_images(daemon, http):
    async with daemon() as d:
        await post(http, d.url, {"conversation_id": "alice", "images": [{"data": b64(RED)}]})
        _, other = await post(http, d.url, {"conversation_id": "bob", "text": "What is it?", "wait": True})
        _, own = await post(http, d.url, {"conversation_id": "alice", "text": "What is it?", "wait": True})
        _, history = await get(http, d.url, "/api/v1/history/api/bob")
    assert other["images"] == []
    assert own["images"] == [sha256(RED)]
    assert all(not m["images"] and not m["used_images"] for m in history["messages"])


async def test_same_image_twice_is_stored_once(daemon, http, data_dir):
    async with daemon() as d:
        for n in range(2):
            await post(http, d.url, {"conversation_id": f"c{n}", "images": [{"data": b64(RED)}]})
    rows = counts(data_dir)
    assert (rows["images"], rows["files"], rows["message_images"]) == (1, 1, 2)
    path = data_dir / "images" / sha256(RED)[:2] / sha256(RED)
    assert path.read_bytes() == RED
    assert path.stat().st_mode & 0o777 == 0o600
    assert data_dir.stat().st_mode & 0o777 == 0o700


async def test_without_wait_the_answer_is_queued_then_readable_as_a_job(daemon, http):
    async with daemon() as d:
        status, queued = await post(http, d.url, {
            "conversation_id": "c1", "text": "What?", "images": [{"data": b64(RED)}],
        })
        assert (status, queued["status"]) == (202, "queued")

        async def done():
            _, job = await get(http, d.url, f"/api/v1/jobs/{queued['job_id']}")
            return job if job["status"] == "done" else None

        job = await eventually(done)
        missing, error = await get(http, d.url, "/api/v1/jobs/nope")
    assert job["status"] == "done" and job["answer"] and job["images"] == [sha256(RED)] and job["error"] is None
    assert missing == 404 and error["error"]["code"] == "not_found"


async def test_wait_longer_than_the_limit_answers_202(daemon, http):
    async with daemon(adapters={"webhook": {"wait_seconds": 0}}, engine={"max_new_tokens": 300}) as d:
        status, body = await post(http, d.url, {
            "conversation_id": "c1", "text": "What?", "wait": True, "images": [{"data": b64(RED)}],
        })
    assert status == 202 and body["job_id"]


async def test_answer_is_posted_signed_to_the_callback_url(daemon, http, aiohttp_server):
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    received: list[tuple[dict[str, str], bytes]] = []
    arrived = asyncio.Event()

    async def callback(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        arrived.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", callback)
    server = await aiohttp_server(app)
    signer = Webhook(secret)
    async with daemon(adapters={"webhook": {"secret": secret}}) as d:
        body = json.dumps({"conversation_id": "c1", "text": "What?", "callback_url": str(server.make_url("/hook"))})
        headers = signed_headers(secret, "msg_1", body.encode())
        async with http.post(f"{d.url}/api/v1/messages", data=body, headers=headers) as resp:
            assert resp.status == 202
            job_id = (await resp.json())["job_id"]
        await asyncio.wait_for(arrived.wait(), 30)
    (got_headers, got_body), = received
    payload = signer.verify(got_body, got_headers)  # the reference implementation accepts our signature
    assert payload["job_id"] == job_id and payload["status"] == "done" and payload["answer"]
    assert got_headers["webhook-id"] == payload["message_id"]


async def test_callback_failures_are_retried_only_when_they_may_heal(daemon, http, aiohttp_server):
    answers = {"/flaky": [503, 204], "/gone": [404, 204]}
    calls: dict[str, int] = {"/flaky": 0, "/gone": 0}

    async def callback(request: web.Request) -> web.Response:
        calls[request.path] += 1
        return web.Response(status=answers[request.path][calls[request.path] - 1])

    app = web.Application()
    app.router.add_post("/{name}", callback)
    server = await aiohttp_server(app)
    async with daemon() as d:
        jobs = {}
        for path in answers:
            _, body = await post(http, d.url, {
                "conversation_id": path, "text": "Q?", "callback_url": str(server.make_url(path)),
            })
            jobs[path] = body["job_id"]

        async def ended(job_id):
            _, job = await get(http, d.url, f"/api/v1/jobs/{job_id}")
            return job if job["status"] in ("done", "failed") else None

        flaky, gone = await eventually(lambda: ended(jobs["/flaky"])), await eventually(lambda: ended(jobs["/gone"]))
    assert (flaky["status"], calls["/flaky"]) == ("done", 2)
    assert (gone["status"], calls["/gone"]) == ("failed", 1)
    assert "not delivered" in gone["error"]


async def test_logs_carry_ids_but_no_secrets_and_no_message_text(daemon, http, caplog):
    token, secret = "tok-9f2c1e", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    caplog.set_level("DEBUG", logger="bot")
    caplog.set_level("DEBUG", logger="adapters")
    async with daemon(adapters={"webhook": {"token": token, "secret": secret}}) as d:
        _, answer = await post(http, d.url, {
            "conversation_id": "c-logs", "text": "confidential quarterly numbers?", "wait": True,
            "images": [{"data": b64(RED)}],
        }, headers={"Authorization": f"Bearer {token}"})
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert answer["job_id"] in logged and "c-logs" in logged
    for private in (token, secret, "confidential", answer["answer"]):
        assert private not in logged
