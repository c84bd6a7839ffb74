"""``make grade``: a class of made-up submissions graded, each exercise pass or fail with a reason.

The reference is a small notebook with two real exercises of the course (chapter 03's ``fits``,
chapter 06's ``cu_seqlens``), so the grading runs real kernels in seconds. The class: one complete
submission, one untouched student copy, one with a syntax error in the first exercise, and one
whose first exercise never returns.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from grade import grade  # noqa: E402
from make_assignments import make_student_copy  # noqa: E402

FITS = """def fits(prompt_len, max_new_tokens, cursor, cache_len):
    ### BEGIN SOLUTION
    return prompt_len <= cursor and cursor + max_new_tokens <= cache_len
    ### END SOLUTION"""
CU = """def cu_seqlens(lengths):
    ### BEGIN SOLUTION
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out
    ### END SOLUTION"""


def reference() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Two exercises"),
                nbformat.v4.new_code_cell(
                    "from checks import check_cu_seqlens, check_fits"),
                nbformat.v4.new_code_cell(FITS), nbformat.v4.new_code_cell("check_fits(fits)"),
                nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell(CU),
                nbformat.v4.new_code_cell("check_cu_seqlens(cu_seqlens)")]
    return nb


def answered(nb, first: str) -> nbformat.NotebookNode:
    """A student copy with the first exercise answered by ``first`` and the second solved."""
    nb = make_student_copy(nb)
    nb.cells[2].source = first
    nb.cells[5].source = "\n".join(line for line in CU.splitlines() if "SOLUTION" not in line)
    return nb


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grade")
    ref = tmp / "notebooks"
    ref.mkdir()
    nbformat.write(reference(), ref / "03_tiny.ipynb")
    subs = tmp / "submissions"
    class_ = {
        "ada": reference(),                                      # the solutions: complete
        "bob": make_student_copy(reference()),                   # untouched
        "cy": answered(reference(),
                       "def fits(prompt_len, max_new_tokens, cursor, cache_len)\n    return True"),
        "dee": answered(reference(), "def fits(*a):\n    return True\nwhile True:\n    pass"),
        "eve": answered(reference(), "def fits(prompt_len, max_new_tokens, cursor, cache_len):\n"
                                     "    return prompt_len < cursor"),             # a wrong answer
    }
    for student, nb in class_.items():
        (subs / student).mkdir(parents=True)
        nbformat.write(nb, subs / student / "03_tiny.ipynb")
    (subs / "fay").mkdir()
    (subs / "fay" / "03_tiny.ipynb").write_text("{ not a notebook")
    grade(subs, ref, timeout=15, echo=lambda *_: None)
    rows = list(csv.DictReader(open(subs / "grades.csv")))
    return subs, {(r["student"], r["exercise"]): r for r in rows}, rows


def test_every_exercise_of_every_student_gets_a_row(graded):
    _, by, rows = graded
    assert list(rows[0]) == ["student", "notebook", "exercise", "passed", "message"]
    assert len(rows) == 6 * 2
    assert {e for _, e in by} == {"1 check_fits", "2 check_cu_seqlens"}


def test_a_complete_submission_passes(graded):
    _, by, _ = graded
    assert by["ada", "1 check_fits"]["passed"] == "True"
    assert by["ada", "2 check_cu_seqlens"]["passed"] == "True"


def test_an_untouched_copy_fails_each_exercise_as_not_attempted(graded):
    _, by, _ = graded
    for ex in ("1 check_fits", "2 check_cu_seqlens"):
        assert by["bob", ex]["passed"] == "False"
        assert "not attempted" in by["bob", ex]["message"]


def test_a_syntax_error_fails_its_exercise_only(graded):
    _, by, _ = graded
    assert by["cy", "1 check_fits"]["passed"] == "False"
    assert "SyntaxError" in by["cy", "1 check_fits"]["message"]
    assert by["cy", "2 check_cu_seqlens"]["passed"] == "True"


def test_an_exercise_that_never_returns_is_stopped_and_the_next_one_graded(graded):
    _, by, _ = graded
    assert by["dee", "1 check_fits"]["passed"] == "False"
    assert "ran past 15 s" in by["dee", "1 check_fits"]["message"]
    assert by["dee", "2 check_cu_seqlens"]["passed"] == "True"


def test_a_wrong_answer_fails_with_the_check_s_reason(graded):
    _, by, _ = graded
    assert by["eve", "1 check_fits"]["passed"] == "False"
    assert "AssertionError" in by["eve", "1 check_fits"]["message"]
    assert "expected" in by["eve", "1 check_fits"]["message"]


def test_an_unreadable_notebook_fails_every_exercise_with_the_reason(graded):
    _, by, _ = graded
    assert all(by["fay", ex]["passed"] == "False" and "cannot be read" in by["fay", ex]["message"]
               for ex in ("1 check_fits", "2 check_cu_seqlens"))


def test_each_student_gets_a_markdown_summary(graded):
    subs, _, _ = graded
    assert (subs / "ada" / "GRADES.md").read_text().startswith("# ada: 2 of 2 exercises passed")
    assert "| 03_tiny | 1 check_fits | FAIL |" in (subs / "bob" / "GRADES.md").read_text()


def test_make_grade_needs_its_folder():
    r = subprocess.run(["make", "-s", "grade"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "SUBMISSIONS" in r.stdout + r.stderr
