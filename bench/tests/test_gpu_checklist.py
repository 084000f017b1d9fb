"""bench/dev/gpu_checklist.sh, the one-run GPU checklist, runs its steps in time boxes and records
each one (exit status, seconds) whether it passes, fails or is out of budget. Checked on the CPU
with steps that need no GPU."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "dev" / "gpu_checklist.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_checklist(tmp_path, steps, budget_s):
    env = dict(os.environ, SKIP_INSTALL="1", STEPS=steps)
    # The script calls `python`: the interpreter running the tests.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path), str(budget_s)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return (tmp_path / "summary.md").read_text()


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_steps_are_recorded_with_their_status(tmp_path):
    summary = run_checklist(tmp_path, "switch nonsense", 60)
    # Without CUDA the switch sweep refuses to run: its exit status 1 is recorded, and the
    # unknown step after it is still reported.
    assert "| switch | 1 |" in summary
    assert "| nonsense | unknown step |" in summary
    assert "needs a CUDA device" in (tmp_path / "switch.log").read_text()


def test_a_spent_budget_skips_the_remaining_steps(tmp_path):
    summary = run_checklist(tmp_path, "switch", 10)
    assert "| switch | skipped: budget spent |" in summary
