"""Every code block of README.md and docs/*.md runs, or is at least constructed, on the versions
installed here (``doc_blocks``: how each kind of block is tested, and the CPU stand-ins).

The Python blocks of one file run in order, in one namespace, in a temporary folder, with the
stand-ins; warnings that steer_fast or a snippet causes on the installed versions (a deprecated
argument) fail the test.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from doc_blocks import (
    DOCS,
    OUTPUT_LANGUAGES,
    REPOSITORY,
    check_shell,
    check_yaml,
    code_blocks,
    construct,
    for_this_machine,
    stand_ins,
)

import steer_fast

BLOCKS = {path: code_blocks(path) for path in DOCS}
IDS = [str(path.relative_to(REPOSITORY)) for path in DOCS]
# Deprecations a snippet must not cause (those of the libraries' own defaults are theirs).
DEPRECATIONS = (DeprecationWarning, FutureWarning)
STEER_FAST = Path(steer_fast.__file__).resolve().parent


def test_every_block_is_tested_somewhere():
    languages = {"python", "bash", "yaml", *OUTPUT_LANGUAGES}
    for blocks in BLOCKS.values():
        for block in blocks:
            assert block.language in languages, f"{block.where}: untested language"
            assert block.mode in ("run", "construct") or (REPOSITORY / block.mode).is_file(), (
                f"{block.where}: {block.mode} is not a test file"
            )
    assert sum(len(b) for b in BLOCKS.values()) > 30


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_python_blocks_run(path, monkeypatch, tmp_path):
    blocks = [b for b in BLOCKS[path] if b.language == "python" and b.mode == "run"]
    if not blocks:
        pytest.skip("no Python block to run")
    stand_ins(monkeypatch)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_snippet__"}
    for block in blocks:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(for_this_machine(block.code), block.where, "exec"), namespace)
        assert not deprecations_caused(block, caught), deprecations_caused(block, caught)


def deprecations_caused(block, caught) -> list[str]:
    """The deprecation warnings ``block`` caused: raised in steer_fast's code, or naming (in
    backticks, as transformers and PEFT do) something the block's code spells out."""
    found = []
    for warning in caught:
        if not issubclass(warning.category, DEPRECATIONS):
            continue
        message = str(warning.message)
        named = [n for n in re.findall(r"`(\w+)`", message) if re.search(rf"\b{n}\b", block.code)]
        if named or STEER_FAST in Path(warning.filename).resolve().parents:
            found.append(f"{block.where}: {warning.category.__name__}: {message}")
    return found


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_construct_blocks_resolve(path):
    blocks = [b for b in BLOCKS[path] if b.language == "python" and b.mode == "construct"]
    if not blocks:
        pytest.skip("no Python block to construct")
    for block in blocks:
        assert not construct(block), f"{block.where}: {construct(block)}"


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_shell_and_yaml_blocks_are_right(path):
    blocks = [b for b in BLOCKS[path] if b.language in ("bash", "yaml")]
    if not blocks:
        pytest.skip("no shell or YAML block")
    for block in blocks:
        check = check_shell if block.language == "bash" else check_yaml
        assert not check(block), f"{block.where}: {check(block)}"
