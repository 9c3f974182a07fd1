"""The history page at /admin: chats, their screenshots as thumbnails with the questions and answers
about each, and a purge button. Server-rendered HTML with a little CSS; no script, no build step.

Access: ``/admin/login?token=...`` once (or ``Authorization: Bearer``) sets a session cookie
(HttpOnly, SameSite=Strict). Every text shown came from a chat: all of it is escaped, and the
Content-Security-Policy allows no script at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import time
from collections.abc import Awaitable, Callable
from html import escape
from urllib.parse import quote

from aiohttp import web
from PIL import Image

from bot.files import ImageFiles
from bot.store import QuestionView, Store
from core.errors import BadInput, NotFound, Unauthorized

__all__ = ["AdminPages"]

_COOKIE = "imsight_admin"
_THUMB_SIDE = 320
_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; padding: 0 1rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin: 0 0 .5rem; }
table { border-collapse: collapse; width: 100%; } td, th { text-align: left; padding: .35rem .6rem;
  border-bottom: 1px solid #ddd; } a { color: #0b5cad; }
.image { display: flex; gap: 1.2rem; margin: 1.2rem 0; padding: 1rem; border: 1px solid #ddd; border-radius: 6px; }
.image img { width: 240px; height: auto; border: 1px solid #ccc; align-self: flex-start; }
.thread { flex: 1; } .q { margin: 0 0 .8rem; } .meta { color: #666; font-size: 12px; }
.answer { margin: .25rem 0 0 1rem; padding-left: .6rem; border-left: 3px solid #9cc3ea; white-space: pre-wrap; }
.failed { border-left-color: #e39a9a; } .status { font-size: 11px; padding: 0 .35rem; border-radius: 3px;
  background: #eee; } form { display: inline; } button { cursor: pointer; }
"""


class AdminPages:
    def __init__(self, store: Store, files: ImageFiles, token: str,
                 forget: Callable[[str, str], Awaitable[int | None]]) -> None:
        self._store, self._files, self._token, self._forget = store, files, token, forget
        self._session = hmac.new(token.encode(), b"imsight admin session", hashlib.sha256).hexdigest()

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/admin/login", self._login)
        app.router.add_get("/admin", self._chats)
        app.router.add_get("/admin/chats/{platform}/{chat_id}", self._chat)
        app.router.add_post("/admin/chats/{platform}/{chat_id}/purge", self._purge)
        app.router.add_get("/admin/thumbs/{sha}", self._thumb)

    # ---- access -------------------------------------------------------------------------

    async def _login(self, request: web.Request) -> web.Response:
        if not _equal(request.query.get("token", ""), self._token):
            raise Unauthorized("wrong admin token")
        target = request.query.get("next", "/admin")
        if not target.startswith("/admin") or "//" in target:  # only pages of this site
            target = "/admin"
        response = web.HTTPSeeOther(target)
        response.set_cookie(_COOKIE, self._session, httponly=True, samesite="Strict", path="/admin")
        raise response

    def _check(self, request: web.Request) -> None:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if _equal(request.cookies.get(_COOKIE, ""), self._session) or (
                scheme.lower() == "bearer" and _equal(credential.strip(), self._token)):
            return
        raise Unauthorized("open /admin/login?token=... first ([admin] token)")

    # ---- pages --------------------------------------------------------------------------

    async def _chats(self, request: web.Request) -> web.Response:
        self._check(request)
        rows = "".join(
            f"<tr><td>{escape(c.platform)}</td><td><a href=\"{_chat_url(c.platform, c.chat_id)}\">"
            f"{escape(c.chat_id)}</a></td><td>{c.messages}</td><td>{c.images}</td><td>{_time(c.last_at)}</td></tr>"
            for c in await self._store.chats(500))
        body = ("<h1>imsight: chats</h1><table><tr><th>platform</th><th>chat</th><th>messages</th><th>images</th>"
                f"<th>last message</th></tr>{rows or '<tr><td colspan=5>Nothing stored yet.</td></tr>'}</table>")
        return _page("imsight: chats", body)

    async def _chat(self, request: web.Request) -> web.Response:
        self._check(request)
        platform, chat_id = request.match_info["platform"], request.match_info["chat_id"]
        images = await self._store.recent_images(platform, chat_id, None, 200)
        questions = await self._store.questions(platform, chat_id, 1000)
        if not images and not questions:
            raise NotFound(f"nothing stored for {platform} chat {chat_id!r}")
        numbers = {sha: n for n, (sha, _) in enumerate(images, start=1)}
        sections = []
        for sha, message in images:
            thread = "".join(_question(q, numbers) for q in questions if sha in q.images)
            sections.append(
                f"<section class=\"image\" id=\"image-{numbers[sha]}\"><img src=\"/admin/thumbs/{sha}\" "
                f"alt=\"image {numbers[sha]}\"><div class=\"thread\"><h2>Image {numbers[sha]}</h2>"
                f"<p class=\"meta\">posted by {escape(message.sender_name or message.sender_id or 'someone')} at "
                f"{_time(message.created_at)}</p>{thread or '<p class=meta>No questions about it yet.</p>'}"
                "</div></section>")
        text_only = "".join(_question(q, numbers) for q in questions if not q.images)
        if text_only:
            sections.append(f"<section class=\"image\"><div class=\"thread\"><h2>Without an image</h2>{text_only}"
                            "</div></section>")
        body = (f"<p><a href=\"/admin\">all chats</a></p><h1>{escape(platform)} chat {escape(chat_id)}</h1>"
                f"<form method=\"post\" action=\"{_chat_url(platform, chat_id)}/purge\"><button>Purge this chat"
                f"</button></form>{''.join(sections)}")
        return _page(f"imsight: {platform} {chat_id}", body)

    async def _purge(self, request: web.Request) -> web.Response:
        """First a page that asks; its button posts ``confirm=yes``, and only that deletes."""
        self._check(request)
        platform, chat_id = request.match_info["platform"], request.match_info["chat_id"]
        form = await request.post()
        if form.get("confirm") != "yes":
            body = (f"<h1>Purge {escape(platform)} chat {escape(chat_id)}?</h1><p>This deletes its messages, "
                    "images and answers, here and for the bot. It cannot be undone.</p>"
                    f"<form method=\"post\"><input type=\"hidden\" name=\"confirm\" value=\"yes\">"
                    f"<button>Yes, purge it</button></form> <a href=\"{_chat_url(platform, chat_id)}\">No, go back</a>")
            return _page("imsight: purge?", body)
        forgotten = await self._forget(platform, chat_id)
        if forgotten is None:
            raise BadInput("a question of this chat is being answered; purge it when that is done", code="busy_chat")
        return _page("imsight: purged", f"<h1>Purged</h1><p>{forgotten} message(s) of {escape(platform)} chat "
                     f"{escape(chat_id)} deleted.</p><p><a href=\"/admin\">all chats</a></p>")

    async def _thumb(self, request: web.Request) -> web.Response:
        self._check(request)
        sha = request.match_info["sha"]
        try:
            data = await asyncio.to_thread(lambda: _thumbnail(self._files.read(sha)))  # read off the loop too
        except (ValueError, OSError):  # not a digest, or no such file
            raise NotFound("no such image") from None
        return web.Response(body=data, content_type="image/png",
                            headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"})


def _question(q: QuestionView, numbers: dict[str, int]) -> str:
    used = ", ".join(f"image {numbers[s]}" if s in numbers else "an older image" for s in q.images) or "no image"
    failed = q.status == "failed"
    if q.answer is not None:
        answer = f"<div class=\"answer{' failed' if failed else ''}\">{escape(q.answer)}</div>"
    else:
        answer = f"<div class=\"answer failed\">{escape(q.error or 'not answered yet')}</div>" if failed else ""
    return (f"<div class=\"q\"><div><b>{escape(q.asker or 'someone')}</b>: {escape(q.text)}</div>"
            f"<div class=\"meta\">{_time(q.asked_at)} · about {used} · <span class=\"status\">{escape(q.status)}"
            f"</span>{' · answered ' + _time(q.answered_at) if q.answered_at else ''}</div>{answer}</div>")


def _page(title: str, body: str) -> web.Response:
    html = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>")
    return web.Response(text=html, content_type="text/html",
                        headers={"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})


def _thumbnail(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((_THUMB_SIDE, _THUMB_SIDE))
        out = io.BytesIO()
        image.convert("RGB").save(out, "PNG", optimize=True)
        return out.getvalue()


def _chat_url(platform: str, chat_id: str) -> str:
    return f"/admin/chats/{quote(platform, safe='')}/{quote(chat_id, safe='')}"


def _time(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else ""


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))
