"""A platform that cannot start stops ``imsight run`` with one line: the platform, what failed, the
fix. No traceback unless -v, and never a secret, in anything the process prints."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
from pathlib import Path

import pytest
from aiohttp import web

from adapters.startup import explain
from core.errors import AdapterError
from helpers import free_port, loopback

SECRETS = {
    "IMSIGHT_TELEGRAM_TOKEN": "987654:SECRET-telegram-token-abcdef",
    "IMSIGHT_FEISHU_APP_SECRET": "SECRET-feishu-app-secret",
    "IMSIGHT_FEISHU_VERIFICATION_TOKEN": "SECRET-feishu-verification",
    "IMSIGHT_DINGTALK_APP_SECRET": "SECRET-dingtalk-app-secret",
    "IMSIGHT_WEBHOOK_TOKEN": "SECRET-api-bearer-token",
}


def _refusing_platform() -> web.Application:
    """Answers every platform's credential check with its own 'wrong credentials' reply."""

    async def telegram(request: web.Request) -> web.Response:
        return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)

    async def feishu(request: web.Request) -> web.Response:
        return web.json_response({"code": 10014, "msg": "app secret invalid"})

    async def dingtalk(request: web.Request) -> web.Response:
        return web.json_response({"code": "invalidClientSecret", "message": "wrong secret"}, status=400)

    app = web.Application()
    app.router.add_post("/bot{token}/{method}", telegram)
    app.router.add_post("/open-apis/auth/v3/tenant_access_token/internal", feishu)
    app.router.add_post("/v1.0/oauth2/accessToken", dingtalk)
    return app


def _config(tmp_path: Path, tiny_model: Path, platform: str, base_url: str) -> Path:
    section = {
        "telegram": f'[adapters.telegram]\nenabled = true\nbase_url = "{base_url}/bot"\n',
        "feishu": f'[adapters.feishu]\nenabled = true\napp_id = "cli_x"\nbase_url = "{base_url}"\n',
        "dingtalk": f'[adapters.dingtalk]\nenabled = true\napp_key = "ding_x"\nbase_url = "{base_url}"\n',
    }[platform]
    path = tmp_path / f"{platform}.toml"
    path.write_text(f'[server]\nport = 0\n[storage]\ndata_dir = "data"\n'
                    f'[engine]\nmodel_path = "{tiny_model}"\nwarmup = false\n{section}')
    return path


async def _run(config: Path, *flags: str) -> tuple[int, str, str]:
    env = {**os.environ, **SECRETS}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "run", "--config", str(config), *flags, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 90)
    return process.returncode or 0, out.decode(), err.decode()


def _assert_clean(output: str) -> None:
    leaked = [name for name, value in SECRETS.items() if value in output]
    assert not leaked, f"{leaked} printed:\n{output}"


@pytest.mark.parametrize("platform", ["telegram", "feishu", "dingtalk"])
async def test_wrong_credentials_and_no_route_end_in_one_line(platform, tmp_path, tiny_model) -> None:
    async with loopback(_refusing_platform()) as url:
        rc, out, err = await _run(_config(tmp_path, tiny_model, platform, url))
    _assert_clean(out + err)
    assert rc == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"imsight: {platform}: the platform refused the bot's credentials"), err
    assert "Fix: check the token or app secret" in last

    rc, out, err = await _run(_config(tmp_path, tiny_model, platform, f"http://127.0.0.1:{free_port()}"))
    _assert_clean(out + err)
    assert rc == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"imsight: {platform}: cannot connect to the API at "), err


async def test_with_v_the_traceback_is_shown_still_without_secrets(tmp_path, tiny_model) -> None:
    async with loopback(_refusing_platform()) as url:
        rc, out, err = await _run(_config(tmp_path, tiny_model, "telegram", url), "-v")
    _assert_clean(out + err)
    assert rc == 1
    assert "Traceback" in err and "InvalidToken" in err


async def test_tls_to_a_plain_http_server_is_named(tmp_path, tiny_model) -> None:
    async with loopback(_refusing_platform()) as url:
        rc, out, err = await _run(_config(tmp_path, tiny_model, "feishu", url.replace("http:", "https:")))
    _assert_clean(out + err)
    assert rc == 1 and "Traceback" not in err
    assert "imsight: feishu: TLS failed" in err, err


def test_each_kind_of_failure_is_named_from_the_cause_chain() -> None:
    def caused(outer: Exception, inner: BaseException) -> Exception:
        outer.__cause__ = inner
        return outer

    cases = {
        "cannot resolve": caused(AdapterError("dingtalk", "token"), socket.gaierror(-2, "Name or service not known")),
        "did not answer in time": caused(AdapterError("feishu", "tenant token"), TimeoutError()),
        "TLS failed": caused(RuntimeError("x"), ssl.SSLError(1, "CERTIFICATE_VERIFY_FAILED")),
        "refused the bot's credentials": AdapterError("feishu", "tenant token refused", retryable=False),
        "could not start (KeyError)": KeyError("987654:SECRET-telegram-token-abcdef"),
    }
    for expected, exc in cases.items():
        line = explain("feishu", exc, "https://open.feishu.cn")
        assert expected in line, line
        assert "SECRET" not in line and "\n" not in line
