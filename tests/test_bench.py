"""Every script in bench/ runs in its quick mode, so a benchmark that no longer runs fails the tests.

Their figures mean nothing here (2 shared cores, a tiny model or a stand-in engine); what is
checked is that each runs to its end and prints what it is for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "api_overhead.py": (["--quick"], ["daemon cost", "queued question"]),
    "soak.py": (["--quick"], ["lost answers                    0", "duplicated answers              0"]),
    "engine_bench.py": (["--quick"], ["time to first token", "8 at once", "greedy output equals bare generate()"]),
    "engine_smoke.py": ([], ["cuda available"]),
    "int4_kernels.py": ([], ["cuda available"]),
    "daemon_bench.py": (["--quick"], ["one answer", "8 chats within one second", "slowest ="]),
}


def test_every_bench_script_is_covered():
    found = {p.name for p in (ROOT / "bench").glob("*.py")} - {"stand_in.py", "glm_model.py", "screens.py"}  # helpers
    assert found == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_runs_in_quick_mode(script, tmp_path):
    args, expected = SCRIPTS[script]
    if script == "engine_bench.py":
        args = [*args, "--work", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for text in expected:
        assert text in done.stdout, done.stdout[-3000:]
