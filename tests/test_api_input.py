"""Bad input to the generic API: a clear JSON error, the right status, and nothing stored."""

from __future__ import annotations

import io
import json
import os

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from core.images import sha256
from helpers import b64, counts, png, post, signed_headers

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TOKEN = "t0ken"


def _bomb() -> bytes:
    # 48 megapixels of one bit each: a ~6 KB file that would decode to 144 MB as RGB.
    out = io.BytesIO()
    Image.new("1", (8000, 6000)).save(out, "PNG")
    return out.getvalue()


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


GOOD = {"conversation_id": "c1", "text": "What?", "images": [{"data": b64(png())}]}
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

CASES = {
    "malformed json": (b'{"conversation_id": "c1",', AUTH, 400, "malformed_json"),
    "json not an object": (b"[1, 2]", AUTH, 400, "malformed_json"),
    "missing conversation_id": (_json({"text": "hi"}), AUTH, 400, "invalid_field"),
    "empty conversation_id": (_json({"conversation_id": "", "text": "hi"}), AUTH, 400, "invalid_field"),
    "wrong type": (_json({"conversation_id": "c1", "images": "x"}), AUTH, 400, "invalid_field"),
    "not an image": (_json({"conversation_id": "c1", "images": [{"data": b64(b"hello, world")}]}),
                     AUTH, 415, "not_an_image"),
    "svg": (_json({"conversation_id": "c1", "images": [{"data": b64(
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')}]}), AUTH, 415, "not_an_image"),
    "truncated image": (_json({"conversation_id": "c1", "images": [{"data": b64(png()[:60])}]}),
                        AUTH, 400, "broken_image"),
    "decompression bomb": (_json({"conversation_id": "c1", "images": [{"data": b64(_bomb())}]}),
                           AUTH, 400, "image_bomb"),
    "bad base64": (_json({"conversation_id": "c1", "images": [{"data": "!!not base64!!"}]}),
                   AUTH, 400, "malformed_image_data"),
    "image over the limit": (_json({"conversation_id": "c1", "images": [{"data": b64(png() + os.urandom(60_000))}]}),
                             AUTH, 413, "too_large"),
    "body over the limit": (_json({"conversation_id": "c1", "text": "x" * 200_000}), AUTH, 413, "too_large"),
    "url host not allowed": (_json({"conversation_id": "c1", "images": [{"url": "http://example.com/a.png"}]}),
                             AUTH, 400, "image_url_refused"),
    "no credentials": (_json(GOOD), {"Content-Type": "application/json"}, 401, "unauthorized"),
    "wrong token": (_json(GOOD), {"Authorization": "Bearer nope", "Content-Type": "application/json"},
                    401, "unauthorized"),
    "forged signature": (_json(GOOD), {**signed_headers("whsec_" + b64(b"another secret"), "m1", _json(GOOD)),
                                       "Authorization": f"Bearer {TOKEN}"}, 401, "unauthorized"),
    "replayed signature": (_json(GOOD), signed_headers(SECRET, "m1", _json(GOOD), age_s=600), 401, "unauthorized"),
    "signature over another body": (_json({**GOOD, "text": "changed"}), signed_headers(SECRET, "m1", _json(GOOD)),
                                    401, "unauthorized"),
}


@pytest.mark.parametrize("case", CASES)
async def test_bad_input_gets_its_status_and_changes_nothing(case, daemon, http, data_dir):
    body, headers, status, code = CASES[case]
    config = {
        "adapters": {"webhook": {"token": TOKEN, "secret": SECRET}},
        "server": {"max_body_mb": 0.1},
        "images": {"max_mb": 0.05},
    }
    async with daemon(**config) as d:
        before = counts(data_dir)
        async with http.post(f"{d.url}/api/v1/messages", data=body, headers=headers) as resp:
            got = (resp.status, await resp.json())
        after = counts(data_dir)
        # The same daemon still takes good input afterwards.
        ok, _ = await post(http, d.url, GOOD, headers={"Authorization": f"Bearer {TOKEN}"})
    assert got[0] == status, got
    assert got[1]["error"]["code"] == code
    assert got[1]["error"]["message"]
    assert after == before
    assert ok == 202


async def test_duplicate_webhook_id_makes_one_job(daemon, http, data_dir):
    body = _json({"conversation_id": "c1", "text": "What?", "images": [{"data": b64(png())}]})
    async with daemon(adapters={"webhook": {"secret": SECRET}}) as d:
        replies = []
        for _ in range(3):  # a sender retrying the same delivery
            async with http.post(f"{d.url}/api/v1/messages", data=body,
                                 headers=signed_headers(SECRET, "msg_same", body)) as resp:
                replies.append((resp.status, await resp.json()))
    assert {r[1]["job_id"] for r in replies} == {replies[0][1]["job_id"]}
    assert counts(data_dir)["jobs"] == 1
    assert counts(data_dir)["messages"] in (1, 2)  # the question, and the answer once it is done


async def test_get_routes_need_credentials_too(daemon, http):
    async with daemon(adapters={"webhook": {"token": TOKEN}}) as d:
        async with http.get(f"{d.url}/api/v1/history/api/c1") as resp:
            assert resp.status == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(f"{d.url}/api/v1/history/api/c1", headers=auth) as resp:
            assert resp.status == 404  # no such chat
            assert (await resp.json())["error"]["code"] == "not_found"
        await post(http, d.url, {"conversation_id": "c1", "images": [{"data": b64(png())}]}, headers=auth)
        async with http.get(f"{d.url}/api/v1/history/api/c1", headers=auth) as resp:
            assert resp.status == 200
            assert len((await resp.json())["messages"]) == 1
        for bad in ("0", "1001", "many"):
            async with http.get(f"{d.url}/api/v1/history/api/c1?limit={bad}", headers=auth) as resp:
                assert resp.status == 400
        async with http.get(f"{d.url}/healthz") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})


async def test_multipart_upload_with_question(daemon, http):
    form = aiohttp.FormData()
    form.add_field("conversation_id", "c1")
    form.add_field("text", "What is this?")
    form.add_field("wait", "true")
    form.add_field("sender_name", "Ann")
    form.add_field("image", png((1, 2, 3)), filename="shot.png", content_type="image/png")
    async with daemon() as d, http.post(f"{d.url}/api/v1/messages", data=form) as resp:
        body = await resp.json()
    assert resp.status == 200, body
    assert body["images"] == [sha256(png((1, 2, 3)))]


async def test_multipart_with_a_non_image_file_is_refused(daemon, http, data_dir):
    form = aiohttp.FormData()
    form.add_field("conversation_id", "c1")
    form.add_field("image", b"%PDF-1.4 not an image", filename="shot.png", content_type="image/png")
    async with daemon() as d:
        before = counts(data_dir)
        async with http.post(f"{d.url}/api/v1/messages", data=form) as resp:
            assert resp.status == 415
        assert counts(data_dir) == before


@pytest.fixture
async def image_host(aiohttp_server):
    big = png() + os.urandom(60_000)

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=png((9, 9, 9)), content_type="image/png")

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=big, content_type="image/png")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://example.com/elsewhere.png")

    app = web.Application()
    app.router.add_get("/a.png", image)
    app.router.add_get("/huge.png", huge)
    app.router.add_get("/moved.png", moved)
    return await aiohttp_server(app)


async def test_image_urls_are_fetched_from_allowed_hosts(daemon, http, image_host, data_dir):
    url = str(image_host.make_url("/a.png"))
    async with daemon(adapters={"webhook": {"allowed_image_hosts": ["127.0.0.1"]}}, images={"max_mb": 0.05}) as d:
        status, body = await post(http, d.url, {"conversation_id": "c1", "images": [{"url": url}]})
        assert (status, body["images"]) == (200, [sha256(png((9, 9, 9)))])
        before = counts(data_dir)
        for path, expected in (("/huge.png", 413), ("/moved.png", 400), ("/missing.png", 400)):
            status, body = await post(http, d.url, {
                "conversation_id": "c1", "images": [{"url": str(image_host.make_url(path))}],
            })
            assert status == expected, (path, body)
        assert counts(data_dir) == before
