"""The product's rooms and their doors: the module import graph of every package in
pyproject.toml, imports inside functions included, has no circle, and no package
imports one that sits above it (docs/architecture.md draws the same picture)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What each package may import besides itself.  Read upwards: shared/ is the floor; api/ and
# broker_client/ stand on it; the programs stand on those and never on each other.
MAY_IMPORT = {
    "shared": set(),
    "api": {"shared"},
    "broker_client": {"shared"},
    "broker": {"shared"},
    "preprocess_worker": {"shared"},
    "gpu_worker": {"shared"},
    "frontend": {"api", "broker_client", "shared"},
    "batch_worker": {"api", "broker_client", "shared"},
    "batch_cli": {"api", "shared"},
    "mcp_server": {"shared"},
}
FRONTEND_SHARE_LIMIT = 0.25


def product_packages() -> list[str]:
    text = (REPO / "pyproject.toml").read_text()
    return re.findall(r'"(\w+)"', re.search(r"^packages = \[(.*)\]", text, re.M).group(1))


def module_files() -> dict[str, Path]:
    """Dotted module name -> its file, for every module of the product."""
    modules = {}
    for package in product_packages():
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The product modules `name` imports, at module level or inside any function."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` names a module; `from mod import thing` names the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` where only a.b is ours
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of imports as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_checker_sees_circles_and_lazy_imports(tmp_path):
    # The checker itself: a circle made only of an import inside a function is found.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from shared import config\n")
    assert imports_of("frontend.lazy", lazy, {"shared": lazy, "shared.config": lazy}) == {"shared.config"}


def test_every_package_is_placed():
    assert set(product_packages()) == set(MAY_IMPORT), "place the new package in MAY_IMPORT (and the docs)"


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_no_package_imports_one_above_it():
    wrong = sorted(f"{name} imports {target}" for name, targets in import_graph().items() for target in targets
                   if target.split(".")[0] != name.split(".")[0]
                   and target.split(".")[0] not in MAY_IMPORT[name.split(".")[0]])
    assert not wrong, "\n".join(wrong)


def test_the_batch_worker_does_not_load_the_front_end():
    graph = import_graph()
    seen, todo = set(), ["batch_worker.__main__"]
    while todo:  # everything the batch worker loads, transitively
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    assert not [name for name in seen if name.startswith("frontend")]


def test_the_front_end_is_under_a_quarter_of_the_product():
    # Lines of Python, blank lines included, of every product package (tests and bench/ are not product).
    lines = {name: len(path.read_text().splitlines()) for name, path in module_files().items()}
    frontend = sum(n for name, n in lines.items() if name.split(".")[0] == "frontend")
    share = frontend / sum(lines.values())
    assert share < FRONTEND_SHARE_LIMIT, f"frontend/ holds {share:.1%} of the product's Python lines"


def test_the_architecture_doc_gives_every_package_its_paragraph():
    doc = (REPO / "docs" / "architecture.md").read_text()
    rooms = doc.split("## Rooms", 1)[1].split("\n## ", 1)[0]
    unnamed = [package for package in MAY_IMPORT if f"- **`{package}/`**" not in rooms]
    assert not unnamed, f"docs/architecture.md, section Rooms: no paragraph for {unnamed}"
