"""kill -9 between storing an event that came over an outbound connection and the platform hearing
that it arrived: the platform delivers it again to the restarted daemon, which answers it once.

The daemon runs as a subprocess against a fake DingTalk (Stream mode), Feishu (long connection) or
Slack (Socket Mode) on loopback, whose first acknowledgement is lost; the model is a fake
OpenAI-compatible server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from daemon_process import DaemonProcess, model_server_engine
from fake_dingtalk import APP_KEY, FakeDingTalk, callback
from fake_feishu import APP_ID, APP_SECRET, FakeFeishu, event
from fake_openai import FakeOpenAI
from fake_slack import APP_TOKEN, BOT_TOKEN, BOT_USER, FakeSlack, message

from helpers import eventually, free_port, loopback, png

ROOT = Path(__file__).resolve().parents[1]


def _config(path: Path, port: int, data_dir: Path, model_url: str, platform: str, platform_url: str) -> None:
    section = {
        "dingtalk": f'[adapters.dingtalk]\nenabled = true\nmode = "stream"\napp_key = "{APP_KEY}"\n'
                    f'app_secret = "demo-app-secret"\nbase_url = "{platform_url}"\n'
                    f'legacy_base_url = "{platform_url}"\n',
        "feishu": f'[adapters.feishu]\nenabled = true\nmode = "long_connection"\napp_id = "{APP_ID}"\n'
                  f'app_secret = "{APP_SECRET}"\nbase_url = "{platform_url}"\n',
        "slack": f'[adapters.slack]\nenabled = true\napp_token = "{APP_TOKEN}"\nbot_token = "{BOT_TOKEN}"\n'
                 f'base_url = "{platform_url}/api/"\n',
    }[platform]
    path.write_text(f"""
[server]
port = {port}
[storage]
data_dir = "{data_dir}"
{model_server_engine(model_url)}
[adapters.webhook]
enabled = false
{section}""")


@pytest.mark.parametrize("platform", ["dingtalk", "feishu", "slack"])
async def test_kill_9_after_storing_before_the_acknowledgement_arrives_answers_once(tmp_path, platform):
    model = FakeOpenAI()
    fake: Any = {"dingtalk": FakeDingTalk, "feishu": FakeFeishu, "slack": FakeSlack}[platform]()
    port = free_port()
    config = tmp_path / "config.toml"
    async with loopback(model.app()) as model_url, loopback(fake.app()) as fake_url, aiohttp.ClientSession() as http:
        model.url, fake.url = model_url, fake_url
        _config(config, port, tmp_path / "data", model_url, platform, fake_url)
        shot = png((10, 200, 30), (120, 90))
        if platform == "dingtalk":
            fake.pictures["dlc-k"] = shot
            payload = callback(fake, "k1", rich=("what does this say?", "dlc-k"))
        elif platform == "feishu":
            fake.files[("om_k", "img_k")] = shot
            payload = event("om_k", post=("what does this say?", "img_k"), mention_bot=True)
        else:
            payload = message(f"<@{BOT_USER}> what does this say?", ts="77.000001", files=[fake.file("Fk", shot)],
                              kind="app_mention")

        def replies() -> int:
            if platform == "slack":  # one answer: one message in the thread (the placeholder, then edited);
                # one posted just before the kill, its id not yet stored, is found again in the thread and reused
                return sum(post.get("thread_ts") == "77.000001" for post in fake.posts)
            return len(fake.webhook_posts) if platform == "dingtalk" else len(fake.replies)

        daemon = DaemonProcess(config, port, tmp_path)
        await daemon.start(http)
        try:
            await fake.connected(1)
            # The answer still on its way when the daemon dies: answered at once, its reply could go out in the
            # instant before the kill and again after the restart (the outbox had not recorded it as sent).
            model.delay_s = 3.0
            if platform == "slack":
                fake.post_delay_s = 3.0  # Slack answers the placeholder's post only after the kill
            fake.ignore_acks = 1  # lost on the way: as if the daemon died before it was sent
            frame = await fake.push(payload)
            await eventually(lambda: fake.ignore_acks == 0 or None)  # stored, and acknowledged into the void
            if platform == "slack":  # and its placeholder posted, but its id not yet known to the daemon
                await eventually(lambda: fake.posts or None)
            await daemon.kill()
            fake.post_delay_s = model.delay_s = 0.0
            assert frame in fake.unacked
            await daemon.start(http)  # the fake delivers the event again on the new connection
            await fake.connected(2)
            await eventually(lambda: frame not in fake.unacked or None)
            await eventually(lambda: replies() >= 1 or None)
            await asyncio.sleep(1.0)  # a second answer would have come by now
        finally:
            await daemon.stop()
    assert replies() == 1, daemon.tail()
