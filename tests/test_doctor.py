"""`imsight doctor`: one screen of what works and what does not, each failure with its fix."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fake_dingtalk import APP_KEY, FakeDingTalk
from fake_dingtalk import APP_SECRET as DINGTALK_SECRET
from fake_feishu import APP_ID, VERIFICATION_TOKEN, FakeFeishu
from fake_openai import KEY, MODEL, FakeOpenAI
from fake_telegram import TOKEN, FakeTelegram

from helpers import free_port, loopback


async def doctor(config: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "doctor", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def by_name(output: str) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in json.loads(output)}


def healthy_config(tmp_path: Path, model: Path, engine: str = "") -> Path:
    """A config that passes on this CPU host: the tiny model, the webhook adapter, ``engine`` lines added."""
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[engine]\nmodel_path = "{model}"\n{engine}'
                      '[adapters.webhook]\ntoken = "doctor-token"\n')
    return config


async def test_a_healthy_cpu_host_passes_with_warnings(tmp_path, tiny_model):
    config = healthy_config(tmp_path, tiny_model)
    status, out = await doctor(config, "--json")
    checks = by_name(out)
    assert status == 0, out
    assert {name: c["status"] for name, c in checks.items()} == {
        "python": "ok", "config": "ok", "gpu": "warn", "model files": "ok", "kv slots": "ok", "memory": "ok",
        "data dir": "ok",
        "disk": "ok", "api": "ok"}
    assert "nvidia-smi" in checks["gpu"]["fix"]
    status, text = await doctor(config)  # the same, for people
    assert status == 0 and "WARN  gpu" in text and "0 failed, 1 warning(s)" in text


async def test_fp8_is_checked_where_it_would_run(tmp_path, tiny_model):
    status, out = await doctor(healthy_config(tmp_path, tiny_model, 'quantization = "fp8"\n'), "--json")
    checks = by_name(out)
    assert status == 0, out
    assert checks["fp8"]["status"] == "ok" and "fp8 product runs here" in checks["fp8"]["detail"]
    assert "bitsandbytes" not in checks  # imsight's own mode: no bitsandbytes needed


async def test_weights_kept_unpacked_are_named_in_the_model_check(tmp_path, tiny_model):
    plain = by_name((await doctor(healthy_config(tmp_path, tiny_model, 'quantization = "int4"\n'), "--json"))[1])
    status, out = await doctor(healthy_config(tmp_path, tiny_model, 'quantization = "int4"\nunpacked_weights = true\n'),
                               "--json")
    kept = by_name(out)
    assert status == 0, out
    assert "kept unpacked for prefill" in kept["model files"]["detail"]
    assert "kept unpacked" not in plain["model files"]["detail"]
    assert kept["memory"]["status"] == "ok"  # (the tiny model's copy is far below a GiB; the totals: test_quantization)


def test_the_quantization_check_says_what_this_gpu_runs():
    from bot.doctor import quantization_checks

    [old_gpu] = quantization_checks("fp8", (8, 0))  # an A100: no fp8 product
    assert old_gpu.status == "fail" and "8.9 or later" in old_gpu.detail and "this one is 8.0" in old_gpu.detail
    assert 'quantization = "int4"' in old_gpu.fix
    [hopper] = quantization_checks("fp8", (9, 0))
    assert hopper.status == "ok" and "9.0" in hopper.detail
    assert [c.status for c in quantization_checks("int4", (9, 0))] == ["ok"]
    assert [c.status for c in quantization_checks("int4", None)] == ["warn"]  # unpacked every forward on the CPU
    assert list(quantization_checks("none", None)) == []


def test_the_int4_decode_kernel_check_warns_where_the_kernel_cannot_compile():
    from bot.doctor import int4_decode_kernel_check

    check = int4_decode_kernel_check()  # torch's CPU build: no GPU to compile for
    assert check.status == "warn" and "torch's int4 kernel" in check.detail and "nvrtc" in check.fix


async def test_each_failure_says_how_to_fix_it(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f"""
[storage]
data_dir = "{tmp_path / 'data'}"
[engine]
model_path = "{tmp_path / 'no-such-model'}"
[adapters.telegram]
enabled = true
token = "not-a-token"
[adapters.dingtalk]
enabled = true
app_key = "ding"
app_secret = "s"
""")
    status, out = await doctor(config, "--json")
    checks = by_name(out)
    assert status == 1
    failed = {name for name, c in checks.items() if c["status"] == "fail"}
    assert failed == {"model files", "telegram"}
    assert all(checks[name]["fix"] for name in failed)
    assert checks["dingtalk"]["status"] == "ok" and "allowed_ips" in checks["dingtalk"]["detail"]


async def test_doctor_calls_a_config_valid_exactly_when_run_does(tmp_path):
    (tmp_path / "bad.toml").write_text("[engine]\nmax_new_tokns = 5\n[server]\nport = 'x'\n"
                                       "[adapters.feishu]\nenabled = true\n")
    status, out = await doctor(tmp_path / "bad.toml", "--json")
    detail = by_name(out)["config"]["detail"]
    assert status == 1 and "max_new_tokns: unknown key" in detail and "server.port" in detail
    (tmp_path / "incomplete.toml").write_text("[adapters.feishu]\nenabled = true\napp_id = 'cli_x'\n")
    status, out = await doctor(tmp_path / "incomplete.toml", "--json")
    detail = by_name(out)["config"]["detail"]
    assert status == 1
    assert "adapters.feishu.app_secret: required" in detail and "adapters.feishu.verification_token" in detail
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bot.cli", "run", "--config", str(tmp_path / "incomplete.toml")],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert [line.split(".toml: ", 1)[-1] for line in run.stderr.strip().splitlines()] == [
        line.split(".toml: ", 1)[-1] for line in detail.splitlines()]


async def test_online_tries_each_credential_and_prints_no_secret(tmp_path):
    telegram, feishu, dingtalk, model = FakeTelegram(), FakeFeishu(), FakeDingTalk(), FakeOpenAI()
    async with loopback(telegram.app()) as tg, loopback(feishu.app()) as fs, loopback(dingtalk.app()) as dt, \
            loopback(model.app()) as engine:
        config = tmp_path / "config.toml"
        config.write_text(f"""
[storage]
data_dir = "{tmp_path / 'data'}"
[engine]
kind = "openai"
base_url = "{engine}/v1"
model = "{MODEL}"
api_key = "{KEY}"
[adapters.webhook]
enabled = false
[adapters.telegram]
enabled = true
token = "{TOKEN[:-4]}WXYZwrong-but-well-formed"
base_url = "{tg}/bot"
[adapters.feishu]
enabled = true
app_id = "{APP_ID}"
app_secret = "feishu-wrong-secret"
verification_token = "{VERIFICATION_TOKEN}"
base_url = "{fs}"
[adapters.dingtalk]
enabled = true
app_key = "{APP_KEY}"
app_secret = "{DINGTALK_SECRET}"
base_url = "{dt}"
""")
        status, out = await doctor(config, "--json", "--online")
        offline_port = free_port()
        (tmp_path / "down.toml").write_text(config.read_text().replace(f"{engine}/v1",
                                                                         f"http://127.0.0.1:{offline_port}/v1"))
        down_status, down = await doctor(tmp_path / "down.toml", "--json", "--online")
    checks = by_name(out)
    assert status == 1
    assert {name: c["status"] for name, c in checks.items() if name.endswith("(online)")} == {
        "model server (online)": "ok", "telegram (online)": "fail", "feishu (online)": "fail",
        "dingtalk (online)": "ok"}
    assert "wrong-but-well-formed" not in out and "feishu-wrong-secret" not in out
    assert by_name(down)["model server (online)"]["status"] == "fail" and down_status == 1
