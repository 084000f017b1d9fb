"""The shape of the source tree, as docs/architecture.md describes it, checked on the files.

- ``kernels/`` imports nothing of steer_fast outside itself (it is installed as
  ``steer_fast.kernels``, but it is built, tested and read on its own);
- steer_fast's modules import each other without cycles and never import a private name
  (``_name``) from another module;
- the library holds no tooling: no benchmark, reproduction or command-line code, and the
  ``steer-fast`` command belongs to the steer-fast-bench distribution (``bench/``);
- no module is much over 450 lines, the size at which one job has usually become two.
"""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"steer_fast": ROOT / "steer_fast", "steer_fast.kernels": ROOT / "kernels"}
MAX_LINES = 460


def _modules() -> dict[str, Path]:
    """Module name -> file, for steer_fast and its kernels."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if package == "steer_fast" and parts[:1] == ["kernels"]:
                continue  # the link steer_fast/kernels -> ../kernels: read once, as kernels/
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str]]:
    """(module imported from, name imported) of every steer_fast import in ``path``, relative
    ones resolved; ``name`` is the module's own name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            found += [(source, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return [(source, imported) for source, imported in found if source.startswith("steer_fast")]


def _dependencies(name: str) -> set[str]:
    """The steer_fast modules ``name`` imports (a submodule when the import names one)."""
    deps = set()
    for source, imported in _imports(name, MODULES[name]):
        target = f"{source}.{imported}" if f"{source}.{imported}" in MODULES else source
        if target in MODULES and target != name:
            deps.add(target)
    return deps


def test_the_scan_sees_the_tree():
    assert {"steer_fast", "steer_fast.ops.post_block_steer", "steer_fast.kernels.tiles"} <= set(
        MODULES
    )
    assert "steer_fast.ops.backend" in _dependencies("steer_fast.ops.post_block_steer")


def test_kernels_import_nothing_outside_themselves():
    for name, path in MODULES.items():
        if name.startswith("steer_fast.kernels"):
            outside = [s for s, _ in _imports(name, path) if not s.startswith("steer_fast.kernels")]
            assert not outside, f"{path.relative_to(ROOT)} imports {outside}"
            text = path.read_text(encoding="utf-8")
            assert "from .." not in text, f"{path.relative_to(ROOT)} imports from its parent"


def test_no_private_name_crosses_a_module_boundary():
    crossing = [
        f"{name} imports {imported} from {source}"
        for name, path in MODULES.items()
        for source, imported in _imports(name, path)
        if imported.startswith("_") and f"{source}.{imported}" not in MODULES
    ]
    assert not crossing, crossing


def test_no_import_cycles():
    graph = {name: _dependencies(name) for name in MODULES}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, name, dep])}")
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_library_ships_no_tooling():
    names = set(MODULES)
    for tool in ("benchmark", "reproduce", "cli", "traffic", "__main__"):
        assert not any(part == tool for n in names for part in n.split(".")), tool
    scripts = [e for e in importlib.metadata.entry_points(group="console_scripts")]
    owners = {e.name: e.dist.name if e.dist else None for e in scripts if e.name == "steer-fast"}
    assert owners in ({}, {"steer-fast": "steer-fast-bench"}), owners
    library = importlib.metadata.distribution("steer_fast")
    assert not [e for e in library.entry_points if e.group == "console_scripts"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines"
