"""The deployment files agree with the code: the command they run, the files they copy, the checks they make."""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

from bot.cli import build_parser
from bot.config import Config

ROOT = Path(__file__).resolve().parents[1]


def test_the_systemd_unit_runs_the_daemon_with_room_to_stop():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read(ROOT / "deploy" / "imsight.service")
    service = unit["Service"]
    binary, *args = shlex.split(service["ExecStart"])
    assert binary.endswith("/imsight")
    parsed = build_parser().parse_args(args)
    assert (parsed.command, str(parsed.config)) == ("run", "/etc/imsight/config.toml")
    assert int(service["TimeoutStopSec"]) > Config().server.shutdown_grace_seconds  # the answer in progress ends
    assert (service["User"], service["StateDirectoryMode"], service["Restart"]) == ("imsight", "0700", "on-failure")
    assert "HF_HUB_OFFLINE=1" in service["Environment"]


def test_the_dockerfile_copies_what_exists_and_checks_readyz():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):
        for source in sources.split():
            assert (ROOT / source).exists(), source
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.MULTILINE).group(1))
    assert build_parser().parse_args(entrypoint[1:]).command == "run"
    assert "/readyz" in text and "HF_HUB_OFFLINE=1" in text
    assert "/models" in text and "COPY models" not in text  # the model is mounted, not baked in
