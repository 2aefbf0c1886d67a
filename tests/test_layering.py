"""Imports point down the layers docs/architecture.md declares (STYLE.md, rule 10).

The order is declared once, as the table under "## Layers" in docs/architecture.md; this test reads
that table and parses (with `ast`, importing nothing) every import of every module in hvdbert/:
module-level and function-level ones alike; those under `if TYPE_CHECKING:` are left out, since they
never run. An import of a module in a higher row fails, as does a module the table does not place
(a new module gets its row when it is added) or a table entry that names no module.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hvdbert"
ARCHITECTURE = REPO / "docs" / "architecture.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|([^|]*)\|")


def declared_layers() -> dict[str, int]:
    """Each table entry (a module name under hvdbert/, dotted) and its row number, 1 at the top."""
    lines = ARCHITECTURE.read_text(encoding="utf-8").splitlines()
    start = lines.index("## Layers")
    layers: dict[str, int] = {}
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        row = ROW.match(line)
        if row:
            for name in re.findall(r"`([^`]+)`", row.group(2)):
                assert name not in layers, f"docs/architecture.md places {name} in two rows"
                layers[name] = int(row.group(1))
    assert layers, "docs/architecture.md has no layer table under '## Layers'"
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_entry(module: str, layers: dict[str, int]) -> str | None:
    """The most specific table entry for `module`: its own name, else its nearest package's."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in layers:
            return ".".join(parts[:end])
    return None


def _under_type_checking(node: ast.If) -> bool:
    test = node.test
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imported_names(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of everything `path` imports that runs: for `from a import b`, both `a`
    and `a.b` (b may be a module)."""
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _under_type_checking(child):
                for other in child.orelse:
                    visit_statement(other)
                continue
            visit_statement(child)

    def visit_statement(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                package = ["hvdbert", *module.split(".")] if is_package else ["hvdbert", *module.split(".")[:-1]]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        visit(node)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return found


def hvdbert_imports(path: Path, module: str, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) for each hvdbert module `path` imports."""
    targets = []
    for line, name in imported_names(path, module):
        if name != "hvdbert" and not name.startswith("hvdbert."):
            continue
        parts = name.split(".")[1:]
        while parts and ".".join(parts) not in known:  # `from hvdbert.x import f`: f is not a module
            parts.pop()
        target = ".".join(parts) if parts else "__init__"
        if target != module:
            targets.append((line, target))
    return targets


def test_every_module_has_a_layer_and_every_entry_a_module():
    layers, known = declared_layers(), modules()
    unplaced = [m for m in known if layer_entry(m, layers) is None]
    assert not unplaced, f"modules with no row in docs/architecture.md's layer table: {unplaced}"
    stale = [entry for entry in layers if entry not in known]
    assert not stale, f"docs/architecture.md's layer table names modules that do not exist: {stale}"


def test_imports_point_down_the_layers():
    layers, known = declared_layers(), modules()
    upward = []
    for module, path in known.items():
        own = layers[layer_entry(module, layers)]
        for line, target in hvdbert_imports(path, module, known):
            theirs = layers[layer_entry(target, layers)]
            if theirs < own:
                upward.append(f"hvdbert/{path.relative_to(PACKAGE)}:{line}: {module} (layer {own}) imports "
                              f"{target} (layer {theirs}, above it)")
    assert not upward, "imports that point up docs/architecture.md's layers:\n" + "\n".join(upward)


def test_only_the_distributed_layer_imports_horovod():
    importers = sorted({module for module, path in modules().items()
                        for _, name in imported_names(path, module) if name.split(".")[0] == "horovod"})
    assert importers == ["dist"], importers


def test_the_checker_sees_function_level_imports_and_skips_type_checking_ones(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from hvdbert.run import Run\n"
                      "def f():\n    from hvdbert.pretrain import main\n"
                      "    from . import train\n", encoding="utf-8")
    names = [name for _, name in imported_names(source, "bench.probe")]
    assert "hvdbert.pretrain.main" in names and "hvdbert.bench.train" in names
    assert not any(name.startswith("hvdbert.run") for name in names)
