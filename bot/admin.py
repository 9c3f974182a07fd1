"""The history page at /admin: chats, their screenshots as thumbnails with the questions and answers
about each, and a purge button. Server-rendered HTML with a little CSS; no script, no build step.

Access: the login form posts the admin token (never in a URL) and gets a session cookie that
expires (HttpOnly, SameSite=Strict, Secure over TLS); scripts may send ``Authorization: Bearer``
instead. Failed logins are throttled per address. Every form that changes something carries a
CSRF token tied to the session (and the server refuses any cross-site POST: bot/web.py). Every
text shown came from a chat: all of it is escaped, and the Content-Security-Policy allows no
script at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import quote

from aiohttp import web
from multidict import MultiDictProxy
from PIL import Image

from adapters.http_body import over_tls
from bot.files import ImageFiles
from bot.store import QuestionView, Store
from core.errors import BadInput, Busy, Forbidden, NotFound, Unauthorized

__all__ = ["AdminPages"]

_COOKIE = "imsight_admin"
_THUMB_SIDE = 320
_LOGIN_FAILURES = 5  # per address and minute; more are refused for the rest of that minute
_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; padding: 0 1rem; }
h1 { font-size: 1.4rem; overflow-wrap: anywhere; } h2 { font-size: 1.1rem; margin: 0 0 .5rem; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; } td, th { text-align: left;
  padding: .35rem .6rem; border-bottom: 1px solid #ddd; overflow-wrap: anywhere; } a { color: #0b5cad; }
.image { display: flex; gap: 1.2rem; margin: 1.2rem 0; padding: 1rem; border: 1px solid #ddd; border-radius: 6px; }
.image img { width: 240px; height: auto; border: 1px solid #ccc; display: block; }
.image > a { align-self: flex-start; flex: none; }
.thread { flex: 1; min-width: 0; } .q { margin: 0 0 .8rem; overflow-wrap: anywhere; }
.meta { color: #666; font-size: 12px; }
.answer { margin: .25rem 0 0 1rem; padding-left: .6rem; border-left: 3px solid #9cc3ea; white-space: pre-wrap;
  overflow-wrap: anywhere; }
.failed { border-left-color: #e39a9a; } .status { font-size: 11px; padding: 0 .35rem; border-radius: 3px;
  background: #eee; } form { display: inline; } button { cursor: pointer; }
.login { max-width: 22rem; margin: 4rem auto; } .login input { width: 100%; box-sizing: border-box; padding: .4rem;
  margin: .3rem 0 .8rem; } .error { color: #b00; } header { display: flex; justify-content: space-between; }
"""


class AdminPages:
    def __init__(self, store: Store, files: ImageFiles, token: str,
                 forget: Callable[[str, str], Awaitable[int | None]], *, session_s: float = 8 * 3600) -> None:
        self._store, self._files, self._token, self._forget = store, files, token, forget
        self._key = hmac.new(token.encode(), b"imsight admin session", hashlib.sha256).digest()
        self._session_s = session_s
        self._failures: dict[str, list[float]] = {}  # address -> failed login times, last minute

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/admin/login", self._login_form)
        app.router.add_post("/admin/login", self._login)
        app.router.add_post("/admin/logout", self._logout)
        app.router.add_get("/admin", self._chats)
        app.router.add_get("/admin/chats/{platform}/{chat_id}", self._chat)
        app.router.add_post("/admin/chats/{platform}/{chat_id}/purge", self._purge)
        app.router.add_get("/admin/thumbs/{sha}", self._thumb)
        app.router.add_get("/admin/images/{sha}", self._image)

    # ---- access -------------------------------------------------------------------------

    async def _login_form(self, request: web.Request, *, error: str = "", status: int = 200) -> web.Response:
        target = _local(request.query.get("next", "/admin"))
        message = f"<p class=\"error\">{escape(error)}</p>" if error else ""
        body = ("<div class=\"login\"><h1>imsight history</h1>" + message +
                f"<form method=\"post\" action=\"/admin/login\"><input type=\"hidden\" name=\"next\" "
                f"value=\"{escape(target)}\"><label>Admin token ([admin] token)<input type=\"password\" "
                "name=\"token\" autocomplete=\"current-password\" autofocus required></label>"
                "<button>Log in</button></form></div>")
        return _page("imsight: log in", body, status=status)

    async def _login(self, request: web.Request) -> web.Response:
        address = request.remote or "?"
        now = time.monotonic()
        recent = [t for t in self._failures.get(address, ()) if now - t < 60]
        if len(recent) >= _LOGIN_FAILURES:
            raise Busy("too many failed logins from this address; wait a minute", retry_after_s=60)
        form = await request.post()
        if not _equal(str(form.get("token", "")), self._token):
            self._failures[address] = [*recent, now]
            if len(self._failures) > 10_000:
                self._failures = {a: ts for a, ts in self._failures.items() if now - ts[-1] < 60}
            return await self._login_form(request, error="Wrong token.", status=401)
        self._failures.pop(address, None)
        expires = int(time.time() + self._session_s)
        response = web.HTTPSeeOther(_local(str(form.get("next", "/admin"))))
        response.set_cookie(_COOKIE, f"{expires}.{self._mac(str(expires))}", max_age=int(self._session_s),
                            httponly=True, samesite="Strict", path="/admin", secure=over_tls(request))
        raise response

    async def _logout(self, request: web.Request) -> web.Response:
        session = self._check(request)
        await self._csrf_checked(request, session)
        response = web.HTTPSeeOther("/admin/login")
        response.del_cookie(_COOKIE, path="/admin")
        raise response

    def _check(self, request: web.Request) -> str | None:
        """The session (None for a bearer token); else 401, or to the login form for a page."""
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _equal(credential.strip(), self._token):
            return None
        expires, _, mac = request.cookies.get(_COOKIE, "").partition(".")
        if expires.isdigit() and _equal(mac, self._mac(expires)) and int(expires) > time.time():
            return f"{expires}.{mac}"
        if request.method == "GET" and "/thumbs/" not in request.path and "/images/" not in request.path:
            raise web.HTTPSeeOther(f"/admin/login?next={quote(request.path_qs, safe='/')}")
        raise Unauthorized("log in at /admin/login first ([admin] token), or send Authorization: Bearer")

    async def _csrf_checked(self, request: web.Request, session: str | None) -> MultiDictProxy[Any]:
        """The posted form; for a browser session it must carry the session's CSRF token."""
        form = await request.post()
        if session is not None and not _equal(str(form.get("csrf", "")), self._csrf(session)):
            raise Forbidden("the form is stale or came from another site: reload the page and try again")
        return form

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def _csrf(self, session: str) -> str:
        return self._mac(f"csrf:{session}")[:32]

    def _csrf_field(self, session: str | None) -> str:
        return "" if session is None else f"<input type=\"hidden\" name=\"csrf\" value=\"{self._csrf(session)}\">"

    def _header(self, session: str | None) -> str:
        logout = "" if session is None else (f"<form method=\"post\" action=\"/admin/logout\">"
                                             f"{self._csrf_field(session)}<button>Log out</button></form>")
        return f"<header><a href=\"/admin\">all chats</a>{logout}</header>"

    # ---- pages --------------------------------------------------------------------------

    async def _chats(self, request: web.Request) -> web.Response:
        session = self._check(request)
        rows = "".join(
            f"<tr><td>{escape(c.platform)}</td><td><a href=\"{_chat_url(c.platform, c.chat_id)}\">"
            f"{escape(c.chat_id)}</a></td><td>{c.messages}</td><td>{c.images}</td><td>{_time(c.last_at)}</td></tr>"
            for c in await self._store.chats(500))
        body = (f"{self._header(session)}<h1>imsight: chats</h1><table><tr><th>platform</th><th>chat</th>"
                "<th>messages</th><th>images</th><th>last message</th></tr>"
                f"{rows or '<tr><td colspan=5>Nothing stored yet.</td></tr>'}</table>")
        return _page("imsight: chats", body)

    async def _chat(self, request: web.Request) -> web.Response:
        session = self._check(request)
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
                f"<section class=\"image\" id=\"image-{numbers[sha]}\"><a href=\"/admin/images/{sha}\" "
                f"title=\"the full image\"><img src=\"/admin/thumbs/{sha}\" alt=\"image {numbers[sha]}\"></a>"
                f"<div class=\"thread\"><h2>Image {numbers[sha]}</h2>"
                f"<p class=\"meta\">posted by {escape(message.sender_name or message.sender_id or 'someone')} at "
                f"{_time(message.created_at)}</p>{thread or '<p class=meta>No questions about it yet.</p>'}"
                "</div></section>")
        text_only = "".join(_question(q, numbers) for q in questions if not q.images)
        if text_only:
            sections.append(f"<section class=\"image\"><div class=\"thread\"><h2>Without an image</h2>{text_only}"
                            "</div></section>")
        body = (f"{self._header(session)}<h1>{escape(platform)} chat {escape(chat_id)}</h1>"
                f"<form method=\"post\" action=\"{_chat_url(platform, chat_id)}/purge\">{self._csrf_field(session)}"
                f"<button>Purge this chat</button></form>{''.join(sections)}")
        return _page(f"imsight: {platform} {chat_id}", body)

    async def _purge(self, request: web.Request) -> web.Response:
        """First a page that asks; its button posts ``confirm=yes``, and only that deletes."""
        session = self._check(request)
        form = await self._csrf_checked(request, session)
        platform, chat_id = request.match_info["platform"], request.match_info["chat_id"]
        if form.get("confirm") != "yes":
            body = (f"<h1>Purge {escape(platform)} chat {escape(chat_id)}?</h1><p>This deletes its messages, "
                    "images and answers, here and for the bot. It cannot be undone.</p>"
                    f"<form method=\"post\">{self._csrf_field(session)}<input type=\"hidden\" name=\"confirm\" "
                    "value=\"yes\"><button>Yes, purge it</button></form> "
                    f"<a href=\"{_chat_url(platform, chat_id)}\">No, go back</a>")
            return _page("imsight: purge?", body)
        forgotten = await self._forget(platform, chat_id)
        if forgotten is None:
            raise BadInput("a question of this chat is being answered; purge it when that is done", code="busy_chat")
        return _page("imsight: purged", f"<h1>Purged</h1><p>{forgotten} message(s) of {escape(platform)} chat "
                     f"{escape(chat_id)} deleted.</p><p><a href=\"/admin\">all chats</a></p>")

    async def _thumb(self, request: web.Request) -> web.Response:
        self._check(request)
        data = await self._read(request.match_info["sha"], _thumbnail)
        return web.Response(body=data, content_type="image/png", headers=_IMAGE_HEADERS)

    async def _image(self, request: web.Request) -> web.Response:
        """The image as it was received, shown in the browser (not downloaded), with its own type."""
        self._check(request)
        sha = request.match_info["sha"]
        data = await self._read(sha, lambda raw: raw)
        mime, extension = await asyncio.to_thread(_kind, data)
        return web.Response(body=data, content_type=mime, headers={
            **_IMAGE_HEADERS, "Content-Disposition": f"inline; filename=\"{sha[:16]}.{extension}\""})

    async def _read(self, sha: str, transform: Callable[[bytes], bytes]) -> bytes:
        try:
            return await asyncio.to_thread(lambda: transform(self._files.read(sha)))  # off the loop, reading too
        except (ValueError, OSError):  # not a digest, or no such file
            raise NotFound("no such image") from None


_IMAGE_HEADERS = {"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff",
                  "Content-Security-Policy": "default-src 'none'"}


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


def _page(title: str, body: str, *, status: int = 200) -> web.Response:
    html = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>")
    return web.Response(text=html, content_type="text/html", status=status,
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
    """Local time with its zone, so a reader elsewhere knows what 14:02 means."""
    if not timestamp:
        return ""
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M %Z (UTC%z)")


def _kind(data: bytes) -> tuple[str, str]:
    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format or "PNG"
    return Image.MIME.get(fmt, "application/octet-stream"), fmt.lower().replace("jpeg", "jpg")


def _local(target: str) -> str:
    """Only pages of this site's history: never a redirect elsewhere."""
    return target if target.startswith("/admin") and "//" not in target and "\\" not in target else "/admin"


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))
