"""The layers of docs/architecture.md hold: imports only point down, no circles, the doc matches.

Every ``import`` counts, at module level or inside a function. Parts are the top-level modules
and packages of ``recognite`` (``train``, ``eval``, ``bundle``...).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "recognite"
DOC = ROOT / "docs" / "architecture.md"

FOUNDATION = {"recognite", "_atomic", "_bundle_files", "checkpoint", "preprocessing", "model", "data", "eval",
              "utils", "losses"}
WORKFLOWS = {"train", "bundle", "deploy", "embedding", "evaluate", "export", "gallery", "report", "serve"}
FACE = {"cli", "__main__"}


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _imports(path: Path, name: str, is_package: bool, modules: set[str]) -> set[str]:
    package = name if is_package else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "recognite")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "recognite":
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in modules else target)
    return {m for m in found if m in modules and m != name}


def module_graph() -> dict[str, set[str]]:
    """Module -> the recognite modules it imports (anywhere in its code)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    modules = {name for name, _ in files}
    return {name: _imports(path, name, is_package, modules) for (name, is_package), path in files.items()}


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "recognite"


def part_graph(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = {part_of(m): set() for m in modules}
    for module, targets in modules.items():
        parts[part_of(module)].update(part_of(t) for t in targets if part_of(t) != part_of(module))
    return parts


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def documented_arrows() -> dict[str, set[str]]:
    """The ``- part → a, b`` lines of the doc's "Arrows" section."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Arrows", 1)[1].split("\n## ", 1)[0]
    arrows: dict[str, set[str]] = {}
    for line in section.splitlines():
        match = re.match(r"^- `([\w.]+)` → (.*)$", line.strip())
        if match:
            targets = re.findall(r"`([\w.]+)`", match.group(2))
            arrows[match.group(1)] = set(targets)
    return arrows


def test_every_part_has_a_layer():
    parts = set(part_graph(module_graph()))
    unplaced = parts - FOUNDATION - WORKFLOWS - FACE
    assert not unplaced, f"parts without a layer (add them to docs/architecture.md and this test): {unplaced}"


def test_no_module_imports_another_in_a_circle():
    assert find_cycle(module_graph()) is None


def test_no_part_imports_another_in_a_circle():
    assert find_cycle(part_graph(module_graph())) is None


def test_foundation_imports_only_foundation():
    wrong = {(m, t) for m, targets in module_graph().items() if part_of(m) in FOUNDATION
             for t in targets if part_of(t) not in FOUNDATION}
    assert not wrong, f"foundation modules importing workflows or the CLI: {sorted(wrong)}"


def test_nothing_imports_the_cli():
    wrong = {(m, t) for m, targets in module_graph().items() if part_of(m) not in FACE
             for t in targets if part_of(t) in FACE}
    assert not wrong, f"library modules importing the CLI: {sorted(wrong)}"


def test_the_doc_draws_the_arrows_the_code_has():
    actual = {part: targets for part, targets in part_graph(module_graph()).items()}
    documented = documented_arrows()
    assert set(documented) == set(actual), "parts listed in docs/architecture.md differ from src/recognite"
    for part in sorted(actual):
        assert documented[part] == actual[part], f"docs/architecture.md arrows of {part!r} differ from its imports"


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert part_of("recognite.train.trainer") == "train" and part_of("recognite") == "recognite"


@pytest.mark.parametrize("module", ["recognite.data", "recognite.preprocessing", "recognite.eval"])
def test_foundation_packages_import_without_the_model_package(module):
    """Importing data, preprocessing or eval does not build the backbone registry of recognite.model."""
    import subprocess
    import sys

    code = f"import sys, {module}; print('recognite.model' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def arrows_section() -> str:
    """The "Arrows" lines of docs/architecture.md, made from the code."""
    lines = []
    for part, targets in sorted(part_graph(module_graph()).items()):
        shown = ", ".join(f"`{t}`" for t in sorted(targets)) or "(none)"
        lines.append(f"- `{part}` → {shown}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(arrows_section())
