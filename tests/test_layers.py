"""Layers only look down: config < model < runtime < checkpoint < processing < engine < train < serve, jobs < demo
< cli.
Every import between ernie45's packages (lazy ones inside functions included) must point to the same or a lower
layer, and no module imports itself back through a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ernie45"
LAYER = {
    # the foundation: plain data and maths every layer may use
    "config": 0, "presets": 0, "official_config": 0, "hub": 0, "embedded": 0, "attention": 0,
    "model": 1, "runtime": 2, "checkpoint": 3, "processing": 4, "engine": 5, "train": 6, "serve": 7, "jobs": 7,
    "demo": 8, "cli": 9, "__main__": 9,
}  # fmt: skip


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported ernie45 module, at module level) for every import in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("ernie45"):
                out.append((t, id(node) in top))
    return out


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_packages_import_only_the_same_or_lower_layers():
    wrong = []
    for path in PKG.rglob("*.py"):
        src = _top(_module_name(path))
        if src is None:
            continue  # ernie45/__init__.py: the public face, above everything
        assert src in LAYER, f"{src} has no layer: add it to LAYER in this test"
        for target, _ in _imports(path):
            dst = _top(target)
            if dst is not None and dst in LAYER and LAYER[dst] > LAYER[src]:
                wrong.append(f"{_module_name(path)} -> {target}")
    assert not wrong, "upward imports:\n" + "\n".join(sorted(set(wrong)))


def test_no_import_cycles_between_modules():
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for target, module_level in _imports(path):
            if not module_level:
                continue
            while target and target not in modules:  # `from .x import Name`: the module is x
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                deps.add(target)
        graph[name] = deps
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
