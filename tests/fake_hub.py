"""A fake Hugging Face hub on loopback serving one model directory, as ``snapshot_download`` reads it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

COMMIT = "c" * 40


@dataclass
class FakeHub:
    repo: str  # "org/name"
    files: Path  # the model directory it serves
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self._tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{file}", self._file)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path}")
        return await handler(request)

    def _check(self, request: web.Request) -> None:
        if f"{request.match_info['org']}/{request.match_info['name']}" != self.repo:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"}, text="Repository not found")

    async def _info(self, request: web.Request) -> web.Response:
        self._check(request)
        siblings = [{"rfilename": f.name} for f in sorted(self.files.iterdir())]
        return web.json_response({"id": self.repo, "sha": COMMIT, "siblings": siblings})

    async def _tree(self, request: web.Request) -> web.Response:
        self._check(request)
        return web.json_response([
            {"type": "file", "path": f.name, "size": f.stat().st_size, "oid": hashlib.sha1(f.read_bytes()).hexdigest()}
            for f in sorted(self.files.iterdir())
        ])

    async def _file(self, request: web.Request) -> web.Response:
        self._check(request)
        data = (self.files / request.match_info["file"]).read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                   "Content-Length": str(len(data))}
        return web.Response(headers=headers, body=None if request.method == "HEAD" else data)
