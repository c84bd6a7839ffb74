"""Stored outputs are current: a notebook that shows library code with ``show_source`` shows the
code as it is now, and no stored result comes from a commit with uncommitted changes."""
import ast
import gzip
import inspect
import json

import nbformat
import pytest

from course_lib.lab.nbtools import RESULTS, ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def shown_sources(nb) -> list:
    """``(cell index, expression, stored text)`` for every ``show_source(expr)`` call, paired
    in order with the cell's stored displays."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "show_source(" not in cell.source:
            continue
        calls = [n.args[0] for n in ast.walk(ast.parse(cell.source))
                 if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "show_source"]
        shown = [o["data"]["text/plain"] for o in cell.get("outputs", [])
                 if o.get("output_type") == "display_data" and "text/plain" in o.get("data", {})]
        assert len(shown) >= len(calls), f"cell {i} shows {len(calls)} sources but stores " \
                                         f"{len(shown)} outputs: execute the notebook"
        out += [(i, ast.unparse(c), text) for c, text in zip(calls, shown)]
    return out


def imports_of(nb) -> str:
    """Every import statement of the notebook's code cells, in order."""
    lines = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:             # a cell with magics: its imports are on plain lines
            tree = ast.parse("\n".join(line for line in cell.source.splitlines()
                                       if line.startswith(("import ", "from "))))
        lines += [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return "\n".join(lines)


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if "show_source(" in p.read_text()],
                         ids=lambda p: p.stem)
def test_shown_source_is_the_library_s_source(path):
    nb = nbformat.read(path, as_version=4)
    ns: dict = {}
    exec(imports_of(nb), ns)
    for i, expr, text in shown_sources(nb):
        now = inspect.getsource(eval(expr, ns))
        assert text.strip() == now.strip(), (
            f"{path.name} cell {i}: the stored output of show_source({expr}) is not the "
            f"library's source any more: execute the notebook again")


def test_no_stored_result_comes_from_a_dirty_tree():
    dirty = []
    for f in sorted(RESULTS.rglob("*.json*")):
        raw = f.read_bytes()
        text = (gzip.decompress(raw) if f.suffix == ".gz" else raw).decode()
        commits = {v for k, v in _pairs(json.loads(text)) if k == "course_lib_commit"}
        if any("dirty" in str(c) for c in commits):
            dirty.append(f"{f.relative_to(ROOT)} ({', '.join(sorted(map(str, commits)))})")
    assert not dirty, ("stored results made from a tree with uncommitted changes (run them again "
                       "from a clean commit): " + "; ".join(dirty))


def _pairs(obj):
    """Every (key, value) pair of a JSON document, at any depth."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _pairs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _pairs(v)
