"""Configuration: the example loads, and each kind of mistake names its key in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import load, parse
from core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_config_loads_and_shows_every_key():
    config = load(ROOT / "config.example.toml", environ={})
    assert config.engine.kind == "transformers"
    assert config.adapters.webhook.enabled
    text = (ROOT / "config.example.toml").read_text()
    for section, model in config:
        for key in type(model).model_fields:
            if section == "adapters":
                continue
            shown = f"\n{key} =" in text or f"\n# {key} =" in text  # optional keys are shown commented out
            assert shown, f"[{section}] {key} is missing from config.example.toml"
    for name, adapter in config.adapters:
        for key in type(adapter).model_fields:
            assert f"{key} =" in text, f"[adapters.{name}] {key} is missing from config.example.toml"


def test_the_readme_table_lists_every_key_of_every_section():
    config = load(ROOT / "config.example.toml", environ={})
    readme = (ROOT / "README.md").read_text()
    sections = [(section, model) for section, model in config if section != "adapters"]
    sections += [(f"adapters.{name}", adapter) for name, adapter in config.adapters]
    for section, model in sections:
        row = next((line for line in readme.splitlines() if line.startswith(f"| `[{section}]` |")), None)
        assert row is not None, f"README's configuration table has no row for [{section}]"
        for key in type(model).model_fields:
            assert f"`{key}`" in row, f"README's row for [{section}] does not name {key}"


@pytest.mark.parametrize(("raw", "message"), [
    ({"server": {"prot": 1}}, "server.prot: unknown key"),
    ({"servr": {}}, "servr: unknown key"),
    ({"server": {"port": "eighty"}}, "server.port: Input should be a valid integer"),
    ({"server": {"port": 70000}}, "server.port: Input should be less than or equal to 65535"),
    ({"engine": {"device": "tpu"}}, "engine.device: Input should be 'auto', 'cpu' or 'cuda'"),
    ({"adapters": {"webhook": {"allowed_image_hosts": "a.com"}}}, "adapters.webhook.allowed_image_hosts"),
])
def test_mistakes_name_the_key(raw, message):
    with pytest.raises(ConfigError) as caught:
        parse(raw, environ={})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_secrets_come_from_the_environment_and_are_never_echoed():
    config = parse({}, environ={"IMSIGHT_WEBHOOK_TOKEN": "s3cret", "IMSIGHT_WEBHOOK_SECRET": "whsec_AAAA",
                                "IMSIGHT_ENGINE_API_KEY": "sk-live-1"})
    assert config.adapters.webhook.token.get_secret_value() == "s3cret"
    assert config.engine.api_key.get_secret_value() == "sk-live-1"
    assert "s3cret" not in repr(config) and "sk-live-1" not in repr(config)
    with pytest.raises(ConfigError) as caught:
        parse({"adapters": {"webhook": {"token": 12345}}}, environ={})
    assert "12345" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse({"engine": {"api_key": 67890}}, environ={})
    assert "67890" not in str(caught.value)


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load(path, environ={})


def test_imsight_run_stops_with_one_line_naming_the_key(tmp_path):
    path = tmp_path / "imsight.toml"
    path.write_text("[engine]\nmax_new_tokns = 5\n")
    done = subprocess.run([sys.executable, "-m", "bot.cli", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"imsight: config error: {path}: engine.max_new_tokns: unknown key"
    ]


def test_every_problem_of_a_file_is_reported_at_once_with_the_file(tmp_path):
    path = tmp_path / "many.toml"
    path.write_text('[server]\nprot = 1\nport = "x"\n[adapters.telegram]\nenabled = true\n'
                    '[adapters.webhook]\nsecret = "not-a-secret"\n')
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    lines = str(caught.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert any("server.prot: unknown key" in line for line in lines)
    assert any("server.port" in line for line in lines)
    assert any("adapters.telegram.token: required" in line for line in lines)  # a cross-field one, too
    assert any("adapters.webhook.secret" in line for line in lines)
