"""The `imsight` commands a newcomer runs first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imsight(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_answers_a_question_and_a_follow_up_about_the_same_screenshot():
    done = _imsight("demo")
    assert done.returncode == 0, done.stderr
    assert "question with a screenshot" in done.stdout
    assert "follow-up without an image" in done.stdout
    assert "answered about the same screenshot: yes" in done.stdout


def test_tiny_model_writes_a_loadable_model_directory(tmp_path):
    done = _imsight("tiny-model", str(tmp_path / "m"))
    assert done.returncode == 0, done.stderr
    assert "answers are noise" in done.stdout
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert (tmp_path / "m" / "chat_template.jinja").is_file()


def test_run_logs_one_json_object_per_line_when_asked(tmp_path):
    import signal
    import time
    import urllib.error
    import urllib.request

    from helpers import free_port

    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
port = {port}
[storage]
data_dir = "{tmp_path / 'data'}"
[engine]
kind = "openai"
base_url = "http://127.0.0.1:{free_port()}/v1"
[logging]
format = "json"
[adapters.webhook]
token = "json-log-token"
""")
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "run", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/messages", method="POST",
            data=json.dumps({"conversation_id": "c1", "text": ""}).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer json-log-token"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert any("api chat c1 message" in line["message"] for line in lines)  # the event's line, with its ids
    assert not any("json-log-token" in line["message"] for line in lines)


def test_a_missing_config_says_how_to_make_one(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bot.cli", "run"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert "config.toml: no such file (cp config.example.toml config.toml" in done.stderr


def test_flags_go_before_or_after_the_command_and_bad_values_are_usage_errors(tmp_path):
    for args in (["-v", "doctor", "--config", "nope.toml"], ["doctor", "-v", "--config", "nope.toml"]):
        done = _imsight(*args)
        assert done.returncode == 1 and "no such file" in done.stdout, done
    done = _imsight("history", "purge", "--older-than", "-3")
    assert done.returncode == 2 and "usage:" in done.stderr and "must be 0 or more days" in done.stderr


def test_purge_of_an_unknown_chat_says_so(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[storage]\ndata_dir = "data"\n')
    (tmp_path / "data").mkdir()
    import sqlite3

    sqlite3.connect(tmp_path / "data" / "imsight.db").close()
    done = _imsight("history", "purge", "--conversation", "nobody", "--config", str(config))
    assert done.returncode == 1 and "no stored chat 'nobody'" in done.stderr, done


def test_relative_paths_are_relative_to_the_config_file_and_tiny_model_follows_the_config(tmp_path):
    from bot.config import load

    folder = tmp_path / "etc"
    folder.mkdir()
    config = folder / "my.toml"
    config.write_text('[storage]\ndata_dir = "state"\n[engine]\nmodel_path = "state/tiny-model"\n')
    loaded = load(config, environ={})
    assert loaded.storage.data_dir == folder / "state"
    assert loaded.engine.model_path == folder / "state" / "tiny-model"
    done = subprocess.run([sys.executable, "-m", "bot.cli", "tiny-model", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert (folder / "state" / "tiny-model" / "config.json").is_file()
    assert (folder / "state").stat().st_mode & 0o077 == 0  # private from the start: no warning at `make run`
    again = _imsight("tiny-model", "--config", str(config))
    assert again.returncode == 0 and again.stdout == ""  # there already: nothing to do


def test_run_prints_where_it_listens_and_a_first_try(tmp_path, tiny_model):
    import signal

    from helpers import free_port

    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nport = {port}\n[storage]\ndata_dir = "data"\n'
                      f'[engine]\nmodel_path = "{tiny_model}"\nwarmup = false\n[admin]\nenabled = true\n'
                      'token = "a-long-enough-admin-token"\n')
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines = [proc.stdout.readline() for _ in range(5)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    banner = "".join(lines)
    assert f"imsight is running on http://127.0.0.1:{port}" in banner
    assert "platforms  api" in banner and "model " in banner and f"{port}/admin" in banner
    assert "curl" in banner and "docs/sample-screenshot.png" in banner
