"""steer_fast installs its kernels as steer_fast.kernels and leaves transformers' view intact.

transformers treats any importable top-level ``kernels`` as the Hugging Face kernel-hub package
(``transformers.utils.is_kernels_available``). These checks run in fresh interpreters started
outside the repository, as a user would.
"""

import importlib.metadata
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import steer_fast

REPOSITORY = Path(__file__).resolve().parents[1]
KERNELS_DIR = REPOSITORY / "kernels"


def _run(code: str, cwd: Path | None = None) -> dict:
    """``code`` in a fresh interpreter started in ``cwd`` (a new empty folder by default); the
    JSON object its last line prints."""
    with tempfile.TemporaryDirectory() as empty:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=cwd or empty,
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _hub_kernels_expected() -> bool:
    """What is_kernels_available should say: is the real hub package installed, in range?"""
    from packaging import version
    from transformers.utils import import_utils

    try:
        installed = version.parse(importlib.metadata.version("kernels"))
    except importlib.metadata.PackageNotFoundError:
        return False
    low = version.parse(import_utils.KERNELS_MIN_VERSION)
    high = version.parse(import_utils.KERNELS_MAX_VERSION)
    return low <= installed < high


def test_no_top_level_kernels_package():
    result = _run(
        "import importlib.util, json, steer_fast.kernels.post_block_steer as k\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps({'origin': getattr(spec, 'origin', None), 'kernels': k.__name__}))"
    )
    assert result["kernels"] == "steer_fast.kernels.post_block_steer"
    if result["origin"] is not None:  # only the real hub package may answer to "kernels"
        assert not Path(result["origin"]).resolve().is_relative_to(KERNELS_DIR)
        assert importlib.metadata.version("kernels")


def test_python_started_in_the_repository_root_builds_models():
    """The repository root on sys.path (an interactive python there, a script saved in the
    clone) leaves transformers its kernel-hub package: kernels/ is no regular package."""
    result = _run(
        "import importlib.util, json, transformers, torch, steer_fast\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)\n"
        "logits = transformers.LlamaForCausalLM(config)(torch.tensor([[1, 2, 3]])).logits\n"
        "print(json.dumps({'origin': getattr(spec, 'origin', None), 'shape': list(logits.shape),"
        " 'regular': spec is not None and spec.origin is not None}))",
        cwd=REPOSITORY,
    )
    assert result["shape"] == [1, 3, 64]
    if result["regular"]:  # the hub package is installed: it, not kernels/, answers
        assert not Path(result["origin"]).resolve().is_relative_to(KERNELS_DIR)
    assert not (KERNELS_DIR / "__init__.py").exists()


def test_the_wheel_ships_the_kernels_inside_the_package_only(tmp_path):
    """A wheel built from this checkout: steer_fast/kernels/*.py, and no top-level kernels."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(REPOSITORY),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("steer_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {entry for entry in top_level if not entry.endswith(".dist-info")} == {"steer_fast"}
    kernels = {name.removeprefix("steer_fast/kernels/") for name in names if "/kernels/" in name}
    assert {"post_block_steer.py", "launch.py", "tiles.py"} <= kernels
    assert "__init__.py" not in kernels


def test_transformers_still_behaves():
    result = _run(
        "import json, steer_fast, transformers, torch\n"
        "from transformers.utils import is_kernels_available\n"
        "config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)\n"
        "model = transformers.LlamaForCausalLM(config)\n"
        "logits = model(torch.tensor([[1, 2, 3]])).logits\n"
        "print(json.dumps({'available': is_kernels_available(), 'shape': list(logits.shape)}))"
    )
    assert result["shape"] == [1, 3, 64]
    assert result["available"] == _hub_kernels_expected()
    assert steer_fast.__version__
