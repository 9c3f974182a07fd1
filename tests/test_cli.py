"""The `imsight` commands a newcomer runs first."""

from __future__ import annotations

import json
import subprocess
import sys


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
