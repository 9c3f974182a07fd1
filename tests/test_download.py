"""`imsight download-model` against a fake hub on loopback, then the daemon's offline lookup of the result."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from fake_hub import COMMIT, FakeHub

from helpers import loopback


@pytest.fixture
async def hub(tiny_model):
    fake = FakeHub("acme/tiny", tiny_model)
    async with loopback(fake.app()) as url:
        fake.url = url
        yield fake


async def _imsight(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", *args, env={**base, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode or 0, out.decode(), err.decode()


async def test_download_fills_the_cache_the_daemon_then_loads_offline(hub, tiny_model, tmp_path):
    cache = tmp_path / "hf-cache"
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache)}
    code, out, err = await _imsight("download-model", "acme/tiny", env=env)
    assert code == 0, err
    assert "100%" in err  # the progress bar
    snapshot = cache / "models--acme--tiny" / "snapshots" / COMMIT
    assert {f.name for f in snapshot.iterdir()} == {f.name for f in tiny_model.iterdir()}
    assert 'model = "acme/tiny"' in out
    # The bot host: offline, finds the model in the cache, loads and answers with it.
    image = tmp_path / "shot.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (0, 0, 200)).save(image)
    config = tmp_path / "c.toml"
    config.write_text('[engine]\nmodel = "acme/tiny"\nmax_new_tokens = 4\n')
    requests_before = len(hub.requests)
    code, out, err = await _imsight("ask", "--config", str(config), str(image), "-q", "What?",
                                    env={"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": hub.url})
    assert code == 0, err
    assert len(hub.requests) == requests_before  # nothing was fetched at run time


async def test_download_to_a_directory_prints_the_model_path_line(hub, tmp_path):
    target = tmp_path / "models" / "tiny"
    code, out, err = await _imsight("download-model", "acme/tiny", "--local-dir", str(target),
                                    env={"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "c")})
    assert code == 0, err
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert f'model_path = "{target}"' in out


async def test_an_unknown_model_is_named(hub, tmp_path):
    code, _, err = await _imsight("download-model", "acme/nope", env={"HF_ENDPOINT": hub.url,
                                                                      "HF_HUB_CACHE": str(tmp_path)})
    assert code == 1
    assert "no model 'acme/nope' on the hub" in err


async def test_an_offline_host_refuses_and_says_where_to_run_it(hub, tmp_path):
    code, _, err = await _imsight("download-model", "acme/tiny", env={
        "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert code == 1
    assert "HF_HUB_OFFLINE is set" in err and "--local-dir DIR" in err
    assert hub.requests == []
