"""The library's shape: folders are layers, and no module imports its way back up.

Every ``import`` counts, also those deferred into functions: a deferred import hides a cycle from
Python, not from a reader.
"""
from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parent.parent / "course_lib"

# What each folder may import from the library (besides itself). Engines sit on the model, its
# kernels and the measuring records; measure/ runs engines (the simulator, the ladder); lab/ and
# the command line sit on top of everything.
ALLOWED = {
    "requests": set(),
    "model": {"requests"},
    "kernels": {"model"},
    "engines": {"requests", "model", "kernels", "measure"},
    "measure": {"requests", "model", "kernels", "engines", "bench"},
    "lab": {"requests", "model", "kernels", "engines", "measure", "bench"},
    "bench": {"requests", "model", "kernels", "engines", "measure"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set:
    """The course_lib modules a file imports anywhere in it (``from pkg import mod`` counts as
    ``pkg.mod`` where that is a module)."""
    modules = {module_name(p) for p in LIB.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("course_lib")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("course_lib"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs or {node.module}
    tree = ast.parse(path.read_text())
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree)), \
        f"{path.name}: relative import (the library imports absolutely)"
    return {m for m in found if m in modules}


def graph() -> dict:
    return {module_name(p): imports(p) - {module_name(p)} for p in LIB.rglob("*.py")}


def layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "course_lib"


def find_cycle(edges: dict) -> list | None:
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_library_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_each_folder_imports_only_the_layers_below_it():
    wrong = [f"{m} imports {n}" for m, deps in graph().items() for n in deps
             if layer(m) in ALLOWED and layer(n) != layer(m) and layer(n) not in ALLOWED[layer(m)]
             and layer(n) != "course_lib"]
    assert not wrong, "\n".join(sorted(wrong))


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = graph()
    a, b = next((m, n) for m, deps in sorted(edges.items()) for n in sorted(deps))
    assert find_cycle({**edges, b: edges[b] | {a}}) is not None      # one edge back: a cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_never_imports_the_exercise_checks():
    """``checks/`` grades the library from above: a library module that imported it would tie the
    engines to the exercises."""
    found = [f"{p.relative_to(LIB.parent)}: {name}" for p in LIB.rglob("*.py")
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, (ast.Import, ast.ImportFrom))
             for name in ([a.name for a in node.names] if isinstance(node, ast.Import)
                          else [node.module or ""])
             if name.split(".")[0] == "checks"]
    assert not found, found
