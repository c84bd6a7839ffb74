#!/usr/bin/env python3
"""Generate the student copies of the course notebooks.

Convention (in notebooks/NN_name.ipynb):

* An *exercise cell* is a code cell containing one or more blocks::

      ### BEGIN SOLUTION
      ...the instructor's solution...
      ### END SOLUTION

* The code cell right after an exercise cell is its *check cell*: it calls a
  checker (e.g. ``check_foo(foo)``) that raises on a wrong or missing answer.
* An exercise cell is self-contained: it imports what it needs at its top, so
  the pair (exercise cell, check cell) runs alone in a fresh namespace.

For every notebook with at least one exercise this writes
assignments/NN_name.ipynb, in which each solution block (markers included)
becomes the single line::

      raise NotImplementedError("Exercise: replace this line with your solution")

at the indentation of its BEGIN marker, and every code cell's outputs and
execution count are cleared. Notebook metadata is kept, except the widget state of one run.

Usage::

    python tools/make_assignments.py            # (re)write assignments/
    python tools/make_assignments.py --check    # fail if assignments/ is stale
    python tools/make_assignments.py --notebooks DIR --out DIR [--check]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NOTEBOOKS = REPO_ROOT / "notebooks"
DEFAULT_OUT = REPO_ROOT / "assignments"

BEGIN_MARKER = "### BEGIN SOLUTION"
END_MARKER = "### END SOLUTION"
PLACEHOLDER = 'raise NotImplementedError("Exercise: replace this line with your solution")'

# Anything that looks like a marker; a line that matches this but is not exactly
# one of the two markers is an error rather than silently left in (it would leak
# the solution into the student copy).
_MARKER_LIKE = re.compile(r"^\s*#+\s*(BEGIN|END)\s+SOLUTION\b", re.IGNORECASE)

# Cell metadata that only records when/how a cell ran; dropped from student copies.
_VOLATILE_CELL_METADATA = ("execution", "ExecuteTime", "papermill")
# Notebook metadata that records one run (the widget state of its outputs); dropped likewise.
_VOLATILE_NOTEBOOK_METADATA = ("widgets", "papermill")


class AssignmentError(Exception):
    """A notebook does not follow the exercise convention."""


@dataclass(frozen=True)
class Exercise:
    """One exercise of a notebook (numbers are 1-based, cell indices 0-based)."""

    notebook: str  # notebook stem, e.g. "01_memory_bound"
    number: int  # 1-based position among the notebook's exercises
    cell_index: int  # index of the exercise cell
    check_index: int  # index of its check cell
    solution_source: str  # exercise cell as in notebooks/
    student_source: str  # exercise cell as in assignments/
    check_source: str  # the check cell

    @property
    def id(self) -> str:
        return f"{self.notebook}::exercise-{self.number}"


def _where(notebook: str, cell_index: int | None) -> str:
    return notebook if cell_index is None else f"{notebook}, cell index {cell_index}"


def strip_solutions(source: str, notebook: str = "<notebook>",
                    cell_index: int | None = None) -> tuple[str, int]:
    """Replace every solution block in ``source``; return (new source, number of blocks).

    Raises AssignmentError on a malformed, nested or unpaired marker.
    """
    out: list[str] = []
    blocks = 0
    begin_line: int | None = None  # 1-based line number of the open BEGIN marker
    indent = ""
    for lineno, line in enumerate(source.splitlines(keepends=True), start=1):
        body = line.rstrip("\r\n")
        stripped = body.strip()
        if _MARKER_LIKE.match(body) and stripped not in (BEGIN_MARKER, END_MARKER):
            raise AssignmentError(
                f"{_where(notebook, cell_index)}, line {lineno}: malformed solution marker "
                f"{stripped!r}; write exactly {BEGIN_MARKER!r} or {END_MARKER!r} on a line of "
                "its own"
            )
        if stripped == BEGIN_MARKER:
            if begin_line is not None:
                raise AssignmentError(
                    f"{_where(notebook, cell_index)}, line {lineno}: {BEGIN_MARKER!r} inside the "
                    f"solution block opened at line {begin_line} (missing {END_MARKER!r}?)"
                )
            begin_line = lineno
            indent = body[: len(body) - len(body.lstrip())]
        elif stripped == END_MARKER:
            if begin_line is None:
                raise AssignmentError(
                    f"{_where(notebook, cell_index)}, line {lineno}: {END_MARKER!r} without a "
                    f"preceding {BEGIN_MARKER!r}"
                )
            newline = line[len(body):]
            out.append(indent + PLACEHOLDER + newline)
            blocks += 1
            begin_line = None
        elif begin_line is None:
            out.append(line)
    if begin_line is not None:
        raise AssignmentError(
            f"{_where(notebook, cell_index)}, line {begin_line}: {BEGIN_MARKER!r} without a "
            f"matching {END_MARKER!r}"
        )
    return "".join(out), blocks


def find_exercises(nb: nbformat.NotebookNode, notebook: str = "<notebook>") -> list[Exercise]:
    """All exercises of ``nb`` in order. Raises AssignmentError if the convention is broken."""
    cells = nb.cells
    exercises: list[Exercise] = []
    for i, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        student, blocks = strip_solutions(cell.source, notebook, i)
        if not blocks:
            continue
        if i + 1 >= len(cells):
            raise AssignmentError(
                f"{_where(notebook, i)}: exercise cell is the last cell; it needs a check cell "
                "right after it"
            )
        check = cells[i + 1]
        if check.cell_type != "code":
            raise AssignmentError(
                f"{_where(notebook, i)}: the cell after an exercise cell must be its check "
                f"(code) cell, but cell index {i + 1} is a {check.cell_type} cell"
            )
        if strip_solutions(check.source, notebook, i + 1)[1]:
            raise AssignmentError(
                f"{_where(notebook, i)}: the next cell (index {i + 1}) is another exercise cell; "
                f"each exercise cell needs its own check cell right after it"
            )
        exercises.append(
            Exercise(
                notebook=notebook,
                number=len(exercises) + 1,
                cell_index=i,
                check_index=i + 1,
                solution_source=cell.source,
                student_source=student,
                check_source=check.source,
            )
        )
    return exercises


def make_student_copy(nb: nbformat.NotebookNode,
                      notebook: str = "<notebook>") -> nbformat.NotebookNode:
    """Return a student copy of ``nb`` (``nb`` itself is not modified)."""
    find_exercises(nb, notebook)  # validates the convention (check cells etc.)
    student = copy.deepcopy(nb)
    for key in _VOLATILE_NOTEBOOK_METADATA:
        student.metadata.pop(key, None)
    for i, cell in enumerate(student.cells):
        for key in _VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, notebook, i)[0]
            cell.outputs = []
            cell.execution_count = None
    return student


def read_notebook(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=nbformat.NO_CONVERT)


def source_notebooks(notebooks_dir: Path) -> list[Path]:
    return sorted(p for p in notebooks_dir.glob("*.ipynb") if p.is_file())


def _as_json(nb: nbformat.NotebookNode) -> object:
    """Content of a notebook as plain JSON data (what is compared in --check)."""
    return json.loads(nbformat.writes(nb))


def build(notebooks_dir: Path) -> dict[str, nbformat.NotebookNode]:
    """Student copies keyed by file name, for every notebook that has exercises."""
    copies: dict[str, nbformat.NotebookNode] = {}
    for path in source_notebooks(notebooks_dir):
        nb = read_notebook(path)
        if find_exercises(nb, path.name):
            copies[path.name] = make_student_copy(nb, path.name)
    return copies


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write(notebooks_dir: Path, out_dir: Path) -> int:
    copies = build(notebooks_dir)
    if not copies:
        print(f"No notebook in {_rel(notebooks_dir)} has exercises; nothing to write.")
    for name, nb in copies.items():
        target = out_dir / name
        nbformat.validate(nb)
        if target.exists() and _as_json(read_notebook(target)) == _as_json(nb):
            print(f"unchanged {_rel(target)}")
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
        print(f"wrote     {_rel(target)}")
    # The output folder is entirely generated: a copy whose notebook is gone (or
    # has no exercises any more) is stale.
    if out_dir.is_dir():
        for stale in sorted(out_dir.glob("*.ipynb")):
            if stale.name not in copies:
                stale.unlink()
                print(f"removed   {_rel(stale)} "
                      f"(no notebook with exercises in {_rel(notebooks_dir)})")
    return 0


def check(notebooks_dir: Path, out_dir: Path) -> int:
    copies = build(notebooks_dir)
    problems: list[str] = []
    for name, nb in copies.items():
        target = out_dir / name
        if not target.exists():
            problems.append(f"{_rel(target)}: missing (notebooks/{name} has exercises)")
        elif _as_json(read_notebook(target)) != _as_json(nb):
            problems.append(f"{_rel(target)}: out of date with {_rel(notebooks_dir / name)}")
    if out_dir.is_dir():
        for committed in sorted(out_dir.glob("*.ipynb")):
            if committed.name not in copies:
                source = notebooks_dir / committed.name
                why = "has no exercises" if source.exists() else "does not exist"
                problems.append(f"{_rel(committed)}: no source notebook ({_rel(source)} {why})")
    if problems:
        print("Student copies are stale; run `make assignments` "
              "(python tools/make_assignments.py):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{len(copies)} student cop{'y' if len(copies) == 1 else 'ies'} in {_rel(out_dir)} "
          "up to date.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", type=Path, default=DEFAULT_NOTEBOOKS,
                        help="source notebooks (default: notebooks/)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="student copies (default: assignments/)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the copies in --out are stale")
    args = parser.parse_args(argv)
    try:
        return (check if args.check else write)(args.notebooks, args.out)
    except AssignmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
