"""Real screenshots through the upload clients people use: curl, requests, httpx, aiohttp.

Also the shapes those clients and shells produce: base64 wrapped at 76 columns, base64url, file
parts without a filename, and strict fields (a typo is refused, not dropped with its image).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import random
import shutil
from pathlib import Path

import aiohttp
import httpx
import pytest
import requests
from PIL import Image, ImageDraw

from helpers import counts, png, post

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def full_hd_screenshot() -> bytes:
    """A 1920x1080 PNG like a real screenshot: flat UI areas, lines of 'text', one noisy photo."""
    rng = random.Random(7)
    image = Image.new("RGB", (1920, 1080), (245, 246, 248))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 1920, 48), fill=(40, 44, 52))
    for y in range(80, 1000, 22):
        x = 300
        while x < 1800:
            width = rng.randint(20, 90)
            draw.rectangle((x, y, x + width, y + 10), fill=(rng.randint(0, 90),) * 3)
            x += width + 8
    photo = Image.frombytes("RGB", (400, 300), rng.randbytes(400 * 300 * 3))
    image.paste(photo, (1400, 600))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def screenshot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    data = full_hd_screenshot()
    assert len(data) > 300_000  # well over the ~128 KiB that used to be a 500
    path = tmp_path_factory.mktemp("upload") / "screenshot-1920x1080.png"
    path.write_bytes(data)
    return path, data


def _check(status: int, body: dict, data: bytes) -> None:
    assert status == 200, body
    assert body["status"] == "done", body
    assert body["images"] == [hashlib.sha256(data).hexdigest()]


async def test_a_full_hd_screenshot_from_each_client(daemon, screenshot: tuple[Path, bytes]) -> None:
    screenshot, data = screenshot
    fields = {"text": "what is this?", "wait": "true"}
    async with daemon() as d:
        url = f"{d.url}/api/v1/messages"

        async with aiohttp.ClientSession() as http:
            form = aiohttp.FormData({**fields, "conversation_id": "aiohttp"})
            form.add_field("image", data, filename=screenshot.name, content_type="image/png")
            async with http.post(url, data=form) as resp:
                _check(resp.status, await resp.json(), data)

        def with_requests() -> requests.Response:
            with screenshot.open("rb") as f:
                return requests.post(url, data={**fields, "conversation_id": "requests"},
                                     files={"image": (screenshot.name, f, "image/png")}, timeout=60)

        resp = await asyncio.to_thread(with_requests)
        _check(resp.status_code, resp.json(), data)

        async with httpx.AsyncClient(timeout=60) as client:
            with screenshot.open("rb") as f:
                answer = await client.post(url, data={**fields, "conversation_id": "httpx"},
                                           files={"image": (screenshot.name, f, "image/png")})
        _check(answer.status_code, answer.json(), data)

        curl = shutil.which("curl")
        assert curl, "curl is needed for this test (apt-get install curl)"
        process = await asyncio.create_subprocess_exec(
            curl, "-sS", "-F", "conversation_id=curl", "-F", "text=what is this?", "-F", "wait=true",
            "-F", f"image=@{screenshot}", url, stdout=asyncio.subprocess.PIPE)
        out, _ = await process.communicate()
        _check(200, json.loads(out), data)


def multipart(fields: dict[str, str], image: bytes, boundary: str = "imsight-test-boundary") -> bytes:
    out = bytearray()
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="s.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return bytes(out)


async def test_signed_multipart_screenshot(daemon, screenshot: tuple[Path, bytes]) -> None:
    from adapters.signing import StandardWebhookSigner

    _, data = screenshot
    body = multipart({"conversation_id": "signed", "text": "and this?", "wait": "true"}, data)
    headers = StandardWebhookSigner(SECRET).headers("upload-1", body)
    headers["Content-Type"] = "multipart/form-data; boundary=imsight-test-boundary"
    async with daemon(adapters={"webhook": {"secret": SECRET}}) as d, aiohttp.ClientSession() as http:
        async with http.post(f"{d.url}/api/v1/messages", data=body, headers=headers) as resp:
            _check(resp.status, await resp.json(), data)
        forged = {**headers, "webhook-id": "upload-2"}
        async with http.post(f"{d.url}/api/v1/messages", data=body, headers=forged) as resp:
            assert resp.status == 401
        cut = body[: len(body) // 2]  # a body cut short is refused, never half taken in
        headers = {**StandardWebhookSigner(SECRET).headers("upload-3", cut), "Content-Type": headers["Content-Type"]}
        async with http.post(f"{d.url}/api/v1/messages", data=cut, headers=headers) as resp:
            assert (resp.status, (await resp.json())["error"]["code"]) == (400, "malformed_multipart")


async def test_base64_as_shells_and_browsers_write_it(daemon, http) -> None:
    image = png(size=(300, 200))
    sha = hashlib.sha256(image).hexdigest()
    wrapped = base64.encodebytes(image).decode()  # 76 columns, what `base64` without -w0 prints
    assert "\n" in wrapped
    urlsafe = base64.urlsafe_b64encode(image).decode().rstrip("=")
    async with daemon() as d:
        for n, data in enumerate([wrapped, f"data:image/png;base64,{wrapped}", urlsafe]):
            status, body = await post(http, d.url, {"conversation_id": f"b{n}", "images": [{"data": data}]})
            assert (status, body["images"]) == (200, [sha]), body


async def test_a_file_part_is_an_image_by_its_content(daemon, http) -> None:
    image = png(size=(120, 90))
    boundary = "b0undary"
    async with daemon() as d:
        for n, disposition in enumerate(['name="image"', 'name="image"; filename="shot.png"', 'name="file"',
                                          'name="anything"; filename="shot.png"']):
            for content_type in ("", "Content-Type: image/png\r\n"):
                body = (f'--{boundary}\r\nContent-Disposition: form-data; name="conversation_id"\r\n\r\n'
                        f"p{n}\r\n--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n"
                        f"{content_type}\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
                async with http.post(f"{d.url}/api/v1/messages", data=body, headers={
                        "Content-Type": f"multipart/form-data; boundary={boundary}"}) as resp:
                    answer = await resp.json()
                assert resp.status == 200, (disposition, content_type, answer)
                assert answer["images"] == [hashlib.sha256(image).hexdigest()]


async def test_unknown_fields_are_refused_with_the_closest_name(daemon, http, data_dir) -> None:
    async with daemon() as d:
        status, body = await post(http, d.url, {"conversation_id": "c", "text": "hi", "image": [{"data": "x"}]})
        assert (status, body["error"]["code"]) == (400, "unknown_field")
        assert "'image'" in body["error"]["message"] and "'images'" in body["error"]["message"]
        status, body = await post(http, d.url, {"conversation_id": "c", "sender": {"nmae": "Ann"}})
        assert status == 400 and "'name'" in body["error"]["message"], body
        status, body = await post(http, d.url, {"conversation_id": "c", "images": [{"uri": "https://x"}]})
        assert status == 400 and "'url'" in body["error"]["message"], body
        form = aiohttp.FormData({"conversation_id": "c", "txt": "hi"})
        async with http.post(f"{d.url}/api/v1/messages", data=form) as resp:
            body = await resp.json()
        assert resp.status == 400 and "'text'" in body["error"]["message"], body
        async with http.get(f"{d.url}/api/v1/history/api/c?limt=5") as resp:
            body = await resp.json()
        assert resp.status == 400 and "'limit'" in body["error"]["message"], body
        async with http.post(f"{d.url}/api/v1/messages?wait=true", json={"conversation_id": "c"}) as resp:
            assert resp.status == 400
        assert sum(counts(data_dir).values()) == 0


async def test_unknown_reply_to_is_404_and_stores_nothing(daemon, http, data_dir) -> None:
    async with daemon() as d:
        status, body = await post(http, d.url, {"conversation_id": "c", "images": [{"data": base64.b64encode(
            png()).decode()}]})
        assert status == 200
        before = counts(data_dir)
        status, body = await post(http, d.url, {"conversation_id": "c", "text": "this?", "reply_to": "nope"})
        assert (status, body["error"]["code"]) == (404, "unknown_message"), body
        assert "'nope'" in body["error"]["message"]
        assert counts(data_dir) == before
        status, body = await post(http, d.url, {"conversation_id": "c", "text": "this?", "wait": True,
                                                "reply_to": (await _message_id(http, d.url))})
        assert status == 200, body


async def _message_id(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/api/v1/history/api/c") as resp:
        return str((await resp.json())["messages"][0]["message_id"])


async def test_a_webhook_id_reused_for_another_body_is_409(daemon, http) -> None:
    first = {"conversation_id": "a", "text": "first?"}
    other = {"conversation_id": "b", "text": "other?"}
    async with daemon() as d:
        headers = {"webhook-id": "same-id"}
        async with http.post(f"{d.url}/api/v1/messages", json=first, headers=headers) as resp:
            assert resp.status == 202
            job = (await resp.json())["job_id"]
        async with http.post(f"{d.url}/api/v1/messages", json=first, headers=headers) as resp:
            assert (resp.status, (await resp.json())["job_id"]) == (202, job)  # a redelivery: the same job
        async with http.post(f"{d.url}/api/v1/messages", json=other, headers=headers) as resp:
            body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (409, "conflict"), body
