#!/usr/bin/env python3
"""Grade a class: every submitted notebook, every exercise, pass or fail with a message.

    make grade SUBMISSIONS=DIR          # or: python tools/grade.py DIR

``DIR/<student>/NN_name.ipynb`` are the submissions (a student copy from ``assignments/``, filled
in). Each notebook runs top to bottom in a fresh kernel. A cell that fails does not stop the run;
a cell that runs past ``GRADE_CELL_TIMEOUT`` seconds (default 300) is interrupted, and a kernel
that dies is restarted with the cells before it run again, so one broken exercise never costs
the grade of another.

An exercise passes when its check cell, the one right after the exercise cell in
``notebooks/``, runs without an error. The check that runs is the reference's, whatever the
student did to their copy of it. The results go to ``DIR/grades.csv`` (student, notebook,
exercise, passed, message) and a Markdown summary per student, ``DIR/<student>/GRADES.md``.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_assignments import DEFAULT_NOTEBOOKS, find_exercises  # noqa: E402

COLUMNS = ["student", "notebook", "exercise", "passed", "message"]


def first_line(text: str, width: int = 200) -> str:
    line = next((s for s in str(text).strip().splitlines() if s.strip()), "")
    return line if len(line) <= width else line[:width - 1] + "…"


def error_of(cell) -> str | None:
    """``"Name: value"`` of the error a cell raised, or None."""
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out['ename']}: {first_line(out['evalue'])}".rstrip(": ")
    return None


def run(nb, timeout: int, cwd: Path) -> dict:
    """Run every code cell of ``nb`` in a fresh kernel; return ``{cell index: outcome}`` with
    outcome ``"ok"``, ``"timeout"`` or the error's first line."""
    client = NotebookClient(nb, timeout=timeout, interrupt_on_timeout=True, allow_errors=True,
                            kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    outcome = {}
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    with client.setup_kernel():
        for i in code:
            try:
                client.execute_cell(nb.cells[i], i)
            except (CellTimeoutError, DeadKernelError, TimeoutError, RuntimeError) as e:
                died = isinstance(e, DeadKernelError)
                outcome[i] = f"kernel died: {e}" if died else "timeout"
                client.km.restart_kernel(now=True)          # a fresh kernel, set up as before
                client.kc.wait_for_ready(timeout=60)
                for j in code[:code.index(i)]:
                    if outcome.get(j) == "ok":
                        client.execute_cell(nb.cells[j], j)
                continue
            err = error_of(nb.cells[i])
            if err and ("KeyboardInterrupt" in err or "CellTimeoutError" in err):
                outcome[i] = "timeout"
            else:
                outcome[i] = err or "ok"
    return outcome


def checker(source: str) -> str:
    """The check function a check cell calls (``check_fits``), to name the exercise by."""
    return (re.findall(r"check_\w+", source) or ["check"])[0]


def grade_notebook(path: Path, reference, timeout: int) -> list:
    """``(exercise, passed, message)`` for each exercise of the reference notebook."""
    exercises = find_exercises(reference, path.stem)
    names = [f"{e.number} {checker(e.check_source)}" for e in exercises]
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:                       # not a notebook any more: nothing can pass
        return [(n, False, f"the notebook cannot be read: {first_line(e)}") for n in names]
    checks = {}
    for e in exercises:
        at = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"
                   and c.source.strip() == e.check_source.strip()), None)
        if at is None:                           # edited: put the reference's check where it was
            at = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code" and
                       names[e.number - 1].split()[1] in c.source), None)
            if at is not None:
                nb.cells[at].source = e.check_source
        checks[e.number] = at
    outcome = run(nb, timeout, path.parent)
    rows = []
    for e, name in zip(exercises, names):
        at = checks[e.number]
        if at is None:
            rows.append((name, False, "its check cell is missing from the notebook"))
            continue
        answer = outcome.get(at - 1) if at > 0 else None
        result = outcome.get(at)
        if result == "ok":
            rows.append((name, True, "passed"))
        elif answer == "timeout":
            rows.append((name, False, f"the exercise cell ran past {timeout} s and was stopped"))
        elif "NotImplementedError" in f"{answer} {result}":
            rows.append((name, False, "not attempted: the exercise cell still raises "
                                      "NotImplementedError"))
        elif answer and answer != "ok":
            rows.append((name, False, f"the exercise cell failed: {answer}"))
        elif result == "timeout":
            rows.append((name, False, f"the check ran past {timeout} s and was stopped"))
        else:
            rows.append((name, False, f"the check failed: {result}"))
    return rows


def summary(student: str, rows: list) -> str:
    passed = sum(r["passed"] for r in rows)
    lines = [f"# {student}: {passed} of {len(rows)} exercises passed", "",
             "| notebook | exercise | result | message |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['notebook']} | {r['exercise']} | {'pass' if r['passed'] else 'FAIL'} | "
              f"{r['message'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def grade(submissions: Path, notebooks: Path = DEFAULT_NOTEBOOKS, timeout: int = 300,
          echo=print) -> list:
    """Grade every ``submissions/<student>/*.ipynb``; write grades.csv and the summaries."""
    references = {p.stem: nbformat.read(p, as_version=4) for p in sorted(notebooks.glob("*.ipynb"))}
    rows = []
    for student in sorted(p for p in submissions.iterdir() if p.is_dir()):
        mine = []
        for path in sorted(student.glob("*.ipynb")):
            if path.stem not in references or not find_exercises(references[path.stem]):
                continue
            echo(f"grading {student.name}/{path.name} ...")
            for exercise, passed, message in grade_notebook(path, references[path.stem], timeout):
                mine.append(dict(student=student.name, notebook=path.stem, exercise=exercise,
                                 passed=passed, message=message))
        (student / "GRADES.md").write_text(summary(student.name, mine))
        rows += mine
    with open(submissions / "grades.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("submissions", type=Path, help="a folder with one folder per student")
    p.add_argument("--notebooks", type=Path, default=DEFAULT_NOTEBOOKS,
                   help="the reference notebooks (with solutions and checks)")
    p.add_argument("--timeout", type=int, default=int(os.environ.get("GRADE_CELL_TIMEOUT", 300)),
                   help="seconds a cell may run (default: $GRADE_CELL_TIMEOUT or 300)")
    a = p.parse_args(argv)
    if not a.submissions.is_dir():
        p.error(f"{a.submissions} is not a folder")
    rows = grade(a.submissions, a.notebooks, a.timeout)
    print(f"{sum(r['passed'] for r in rows)} of {len(rows)} exercises passed; "
          f"wrote {a.submissions / 'grades.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
