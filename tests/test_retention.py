"""Retention by age and by size, `imsight history purge`, and stray files, on a real data dir."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from adapters.base import Incoming
from bot.cli import main
from bot.files import ImageFiles
from bot.retention import Retention, purge, sweep_stray_files
from bot.store import NewJob, Store
from core.images import ImageInfo, ImageLimits, inspect, sha256
from helpers import answer_and_send, png

DAY = 86_400.0


class History:
    """Messages written the way intake writes them, at chosen times."""

    def __init__(self, store: Store, files: ImageFiles) -> None:
        self.store, self.files = store, files
        self._n = 0

    async def post(self, chat: str, *, days_ago: float, image: bytes | None = None, ask: bool = False,
                   platform: str = "test") -> str | None:
        self._n += 1
        infos: list[ImageInfo] = []
        if image is not None:
            infos = [inspect(image, ImageLimits())]
            self.files.put(infos[0].sha256, image)
        incoming = Incoming(platform=platform, chat_id=chat, message_id=f"m{self._n}", text="q" if ask else "",
                            addressed=ask, received_at=time.time() - days_ago * DAY)
        job = NewJob(tuple(i.sha256 for i in infos)) if ask else None
        return (await self.store.record(incoming, infos, job)).job_id

    async def answer_all(self) -> None:
        while (job := await self.store.claim_next()) is not None:
            await answer_and_send(self.store, job, "a", f"answer-{job.id}")


@pytest.fixture
async def history(tmp_path: Path):
    async with Store.open(tmp_path / "data" / "imsight.db") as store:
        yield History(store, ImageFiles(tmp_path / "data" / "images"))


def _files(history: History) -> set[str]:
    return {p.name for p in history.files.root.glob("??/*")}


async def test_old_messages_go_but_not_what_an_open_question_needs(history):
    old_img, open_img, new_img = png((1, 1, 1)), png((2, 2, 2)), png((3, 3, 3))
    await history.post("a", days_ago=40, image=old_img, ask=True)
    await history.answer_all()  # an answered question, and its answer, both old
    waiting = await history.post("b", days_ago=40, image=open_img, ask=True)  # still queued
    await history.post("a", days_ago=1, image=new_img)
    swept = await Retention(history.store, history.files, days=30, max_bytes=0).sweep()
    assert (swept.messages, swept.images, swept.kept) == (2, 1, 1)
    assert (await history.store.job(waiting)).status == "queued"
    assert _files(history) == {inspect(i, ImageLimits()).sha256 for i in (open_img, new_img)}
    assert [e.text for e in await history.store.history("test", "a", 10)] == [""]  # the new message


async def test_over_the_size_budget_the_oldest_images_go_first(history):
    images = [png((n, 0, 0), (200 + n, 100)) for n in range(1, 5)]
    for n, image in enumerate(images):
        await history.post("a", days_ago=10 - n, image=image)
    sizes = [len(i) for i in images]
    budget = sum(sizes[2:])  # room for the newest two
    swept = await Retention(history.store, history.files, days=0, max_bytes=budget).sweep()
    assert swept.images == 2
    assert await history.store.retention.image_bytes() <= budget
    assert _files(history) == {inspect(i, ImageLimits()).sha256 for i in images[2:]}


async def test_stray_files_are_swept_once_old(history):
    kept = png((9, 9, 9))
    await history.post("a", days_ago=0, image=kept)
    stray = png((8, 8, 8))
    sha = inspect(stray, ImageLimits()).sha256
    path = history.files.put(sha, stray)  # written, but its message was never committed
    assert await sweep_stray_files(history.store, history.files) == 0  # too new: it may be being taken in
    old = time.time() - 7200
    for p in history.files.root.glob("??/*"):
        os.utime(p, (old, old))
    assert await sweep_stray_files(history.store, history.files) == 1
    assert not path.exists() and _files(history) == {inspect(kept, ImageLimits()).sha256}


async def test_purge_by_conversation_leaves_other_chats(history):
    shared = png((5, 5, 5))
    await history.post("a", days_ago=0, image=shared)
    await history.post("b", days_ago=0, image=shared)
    purged = await purge(history.store, history.files, chat_id="a")
    assert (purged.messages, purged.orphans) == (1, [])  # b still shows the image
    assert _files(history) == {inspect(shared, ImageLimits()).sha256}
    purged = await purge(history.store, history.files, chat_id="b")
    assert len(purged.orphans) == 1 and _files(history) == set()


def test_the_purge_command(tmp_path, capsys):
    data = tmp_path / "data"
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndata_dir = "{data}"\n')

    async def write() -> None:
        async with Store.open(data / "imsight.db") as store:
            history = History(store, ImageFiles(data / "images"))
            await history.post("ops", days_ago=3, image=png((7, 7, 7)))
            await history.post("ops", days_ago=0, ask=True)  # waiting: kept
            await history.post("dev", days_ago=3, image=png((6, 6, 6)), platform="telegram")

    asyncio.run(write())
    assert main(["history", "purge", "--config", str(config), "--older-than", "2"]) == 0
    out = capsys.readouterr().out
    assert "deleted 2 message(s) and 2 image file(s)" in out
    assert main(["history", "purge", "--config", str(config), "--conversation", "ops"]) == 0
    assert "kept 1 message(s)" in capsys.readouterr().out
    assert main(["history", "purge", "--config", str(tmp_path / "nope.toml"), "--conversation", "x"]) == 2
    empty = tmp_path / "empty.toml"
    empty.write_text(f'[storage]\ndata_dir = "{tmp_path / "none"}"\n')
    assert main(["history", "purge", "--config", str(empty), "--older-than", "1"]) == 1
    assert "no history" in capsys.readouterr().err


def test_the_same_image_stored_from_many_threads_at_once_is_stored_once(tmp_path):
    """Two chats may post the same screenshot at the same moment; each write goes through its own
    temporary file, so none of them fails and one file remains."""
    from concurrent.futures import ThreadPoolExecutor

    files = ImageFiles(tmp_path / "images")
    data = png((9, 99, 199), (300, 200))
    digest = sha256(data)
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: files.put(digest, data), range(32)))
    assert len(paths) == 32
    assert files.path(digest).read_bytes() == data
    assert [p.name for p in files.path(digest).parent.iterdir()] == [files.path(digest).name]  # no leftovers
