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
