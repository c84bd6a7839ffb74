"""Tests of tools/make_assignments.py and of the exercises in notebooks/.

(a) unit tests of the generator on small notebooks built here;
(b) for every exercise of every notebook: the solution passes its check cell and
    the student copy does not (one test id per exercise, e.g.
    ``01_memory_bound::exercise-2``);
(c) the committed copies in assignments/ are up to date.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO_ROOT / "notebooks"
TOOL = REPO_ROOT / "tools" / "make_assignments.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_assignments", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


ma = _load_tool()
PLACEHOLDER = ma.PLACEHOLDER


# --------------------------------------------------------------------------- (a)


def _nb(*cells):
    nb = new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["course"] = {"keep": "me"}
    return nb


EXERCISE = """\
import math

def area(r):
    \"\"\"Area of a disc.\"\"\"
    ### BEGIN SOLUTION
    return math.pi * r**2
    ### END SOLUTION
"""

CHECK = "assert abs(area(1.0) - 3.14159) < 1e-4"


def test_block_replaced_at_marker_indentation():
    new, n = ma.strip_solutions(EXERCISE)
    assert n == 1
    assert new == f'import math\n\ndef area(r):\n    """Area of a disc."""\n    {PLACEHOLDER}\n'
    assert "math.pi" not in new


def test_top_level_block_and_no_trailing_newline():
    new, n = ma.strip_solutions("x = 1\n### BEGIN SOLUTION\ny = x + 1\n### END SOLUTION")
    assert (new, n) == (f"x = 1\n{PLACEHOLDER}", 1)


def test_several_blocks_in_one_cell():
    src = (
        "def f():\n"
        "    ### BEGIN SOLUTION\n"
        "    return 1\n"
        "    ### END SOLUTION\n"
        "\n"
        "class C:\n"
        "    def g(self):\n"
        "        ### BEGIN SOLUTION\n"
        "        a = 2\n"
        "        return a\n"
        "        ### END SOLUTION\n"
        "### BEGIN SOLUTION\n"
        "z = f()\n"
        "### END SOLUTION\n"
        "print('kept')\n"
    )
    new, n = ma.strip_solutions(src)
    assert n == 3
    assert new == (
        f"def f():\n    {PLACEHOLDER}\n\nclass C:\n    def g(self):\n        {PLACEHOLDER}\n"
        f"{PLACEHOLDER}\nprint('kept')\n"
    )
    compile(new, "<student>", "exec")  # still valid Python


def test_cell_without_markers_unchanged():
    assert ma.strip_solutions("print('hi')\n") == ("print('hi')\n", 0)


def test_student_copy_clears_outputs_and_keeps_metadata():
    result = new_output("execute_result", {"text/plain": "1"}, execution_count=1)
    intro = new_code_cell("x = 1\nx", execution_count=1, outputs=[result])
    intro.metadata["execution"] = {"iopub.execute_input": "2024-01-01T00:00:00Z"}
    intro.metadata["tags"] = ["keep"]
    ex = new_code_cell(EXERCISE, execution_count=2)
    chk = new_code_cell(CHECK, execution_count=3,
                        outputs=[new_output("stream", name="stdout", text="ok\n")])
    nb = _nb(new_markdown_cell("# Title\n### BEGIN SOLUTION is just text here"), intro, ex, chk)
    before = nbformat.writes(nb)

    student = ma.make_student_copy(nb, "t.ipynb")

    assert nbformat.writes(nb) == before, "the source notebook must not be modified"
    nbformat.validate(student)
    code = [c for c in student.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert student.metadata == nb.metadata
    assert student.cells[1].metadata == {"tags": ["keep"]}
    assert student.cells[0].source == nb.cells[0].source  # markdown untouched
    assert PLACEHOLDER in student.cells[2].source and "math.pi *" not in student.cells[2].source
    assert student.cells[3].source == CHECK
    assert [c.id for c in student.cells] == [c.id for c in nb.cells]


def test_find_exercises_numbers_and_cells():
    nb = _nb(
        new_markdown_cell("intro"),
        new_code_cell(EXERCISE),
        new_code_cell(CHECK),
        new_code_cell("### BEGIN SOLUTION\nk = 3\n### END SOLUTION"),
        new_code_cell("assert k == 3"),
    )
    exs = ma.find_exercises(nb, "01_demo")
    assert [(e.id, e.cell_index, e.check_index) for e in exs] == [
        ("01_demo::exercise-1", 1, 2),
        ("01_demo::exercise-2", 3, 4),
    ]
    assert exs[1].student_source == PLACEHOLDER


@pytest.mark.parametrize(
    "source, message",
    [
        ("### BEGIN SOLUTION\nx = 1\n",
         r"cell index 1, line 1: '### BEGIN SOLUTION' without a matching '### END SOLUTION'"),
        ("x = 1\n### END SOLUTION\n",
         r"cell index 1, line 2: '### END SOLUTION' without a preceding"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n",
         r"cell index 1, line 2: '### BEGIN SOLUTION' inside the solution block opened at "
         r"line 1"),
        ("### BEGIN SOLUTION\nx = 1\n## END SOLUTION\n",
         r"cell index 1, line 3: malformed solution marker '## END SOLUTION'"),
        ("# begin solution\nx = 1\n",
         r"cell index 1, line 1: malformed solution marker '# begin solution'"),
    ],
    ids=["begin-without-end", "end-without-begin", "nested", "malformed-end", "lowercase"],
)
def test_unbalanced_markers_raise_clear_error(source, message):
    nb = _nb(new_markdown_cell("intro"), new_code_cell(source), new_code_cell("pass"))
    with pytest.raises(ma.AssignmentError, match=r"^02_bad\.ipynb, " + message):
        ma.make_student_copy(nb, "02_bad.ipynb")


def test_exercise_as_last_cell_is_an_error():
    nb = _nb(new_code_cell("pass"), new_code_cell(EXERCISE))
    with pytest.raises(ma.AssignmentError,
                       match=r"03_x\.ipynb, cell index 1: exercise cell is the last cell"):
        ma.find_exercises(nb, "03_x.ipynb")


@pytest.mark.parametrize("next_cell", [new_markdown_cell("text"), new_code_cell(EXERCISE)],
                         ids=["markdown", "exercise"])
def test_exercise_needs_a_code_check_cell_after_it(next_cell):
    nb = _nb(new_code_cell(EXERCISE), next_cell, new_code_cell(CHECK))
    with pytest.raises(ma.AssignmentError, match=r"04_x\.ipynb, cell index 0: "):
        ma.find_exercises(nb, "04_x.ipynb")


def _run_tool(*args):
    """The real command line, in a subprocess (about 1 s: nbformat's import is slow)."""
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          cwd=REPO_ROOT)


class _Result:
    def __init__(self, returncode, out, err):
        self.returncode, self.stdout, self.stderr = returncode, out, err


def test_cli_write_and_check(tmp_path, capsys):
    src, out = tmp_path / "nbs", tmp_path / "out"
    src.mkdir()
    nbformat.write(_nb(new_code_cell(EXERCISE, execution_count=1), new_code_cell(CHECK)),
                   src / "01_demo.ipynb")
    nbformat.write(_nb(new_code_cell("print(1)")), src / "02_no_exercise.ipynb")

    def run(*args):  # main() in-process, with the same arguments as the command line
        rc = ma.main(["--notebooks", str(src), "--out", str(out), *args])
        captured = capsys.readouterr()
        return _Result(rc, captured.out, captured.err)

    r = run("--check")
    assert r.returncode == 1 and "01_demo.ipynb: missing" in r.stderr

    r = run()
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "01_demo.ipynb" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["01_demo.ipynb"]
    assert PLACEHOLDER in nbformat.read(out / "01_demo.ipynb", as_version=4).cells[0].source
    assert run("--check").returncode == 0
    assert "unchanged" in run().stdout

    # Only the JSON content matters, not formatting.
    demo = out / "01_demo.ipynb"
    demo.write_text(demo.read_text().replace("\n ", "\n     "))
    assert run("--check").returncode == 0

    # A changed source notebook makes the copy stale.
    nb = nbformat.read(src / "01_demo.ipynb", as_version=4)
    nb.cells[1].source = "assert area(2) > 12"
    nbformat.write(nb, src / "01_demo.ipynb")
    r = run("--check")
    assert r.returncode == 1 and "01_demo.ipynb: out of date" in r.stderr

    # A copy without a notebook is reported, and removed by a regeneration.
    nbformat.write(_nb(new_code_cell("x")), out / "09_orphan.ipynb")
    r = run("--check")
    assert r.returncode == 1 and "09_orphan.ipynb: no source notebook" in r.stderr
    assert run().returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["01_demo.ipynb"]

    # Broken convention: exit 2 naming notebook and cell.
    nbformat.write(_nb(new_code_cell("### BEGIN SOLUTION\nx = 1")), src / "03_bad.ipynb")
    r = run()
    assert r.returncode == 2 and "03_bad.ipynb, cell index 0" in r.stderr


# --------------------------------------------------------------------------- (b)

_MAGIC_TIME = re.compile(r"^(\s*)%time(?:it)?\s+(?!-)(.+)$")


def executable(source: str) -> str:
    """Cell source runnable outside IPython: drop `%magic` and `!shell` lines.

    ``%time stmt`` / ``%timeit stmt`` keep ``stmt``; other magic/shell lines become
    ``pass`` at their indentation so that blocks stay valid.
    """
    lines = []
    for line in source.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("%", "!")):
            m = _MAGIC_TIME.match(line)
            indent = line[: len(line) - len(stripped)]
            lines.append(m.group(1) + m.group(2) if m else indent + "pass")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def _collect_exercises():
    params = []
    for path in ma.source_notebooks(NOTEBOOKS):
        try:
            nb = ma.read_notebook(path)
            exercises = ma.find_exercises(nb, path.stem)
        except Exception as e:  # reported as a failing test, not a collection error
            params.append(pytest.param(path, e, id=f"{path.stem}::convention"))
            continue
        params += [pytest.param(path, ex, id=ex.id) for ex in exercises]
    if not params:  # fails, not skipped: the checks below would otherwise test nothing
        params.append(pytest.param(NOTEBOOKS, AssertionError("no notebook has an exercise"),
                                   id="no-exercises"))
    return params


@pytest.fixture
def fresh_namespace(monkeypatch):
    """A fresh globals dict; cwd = notebooks/ as for the notebook's kernel."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(NOTEBOOKS)

    def make():
        from IPython.display import display

        return {"__name__": "__main__", "__builtins__": __builtins__, "display": display}

    yield make
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def _exec(source: str, ns: dict, label: str) -> None:
    exec(compile(executable(source), label, "exec"), ns)


@pytest.mark.parametrize("path, exercise", _collect_exercises())
def test_exercise(path, exercise, fresh_namespace):
    if isinstance(exercise, Exception):
        pytest.fail(f"{path.name} breaks the exercise convention: {exercise}")
    nb_name = path.name
    ex_label = f"<{nb_name} cell {exercise.cell_index} (exercise)>"
    ck_label = f"<{nb_name} cell {exercise.check_index} (check)>"

    # The solution, run alone in a fresh namespace, passes its check.
    ns = fresh_namespace()
    try:
        _exec(exercise.solution_source, ns, ex_label)
        _exec(exercise.check_source, ns, ck_label)
    except Exception as e:
        raise AssertionError(
            f"{exercise.id}: the solution (cell {exercise.cell_index}) fails its check "
            f"(cell {exercise.check_index}) when run alone in a fresh namespace; exercise cells "
            f"must be self-contained "
            f"(import what they need at their top). {type(e).__name__}: {e}"
        ) from e

    # The student copy fails: its exercise cell may raise (NotImplementedError), and in
    # any case the check cell run after it must raise too (never pass on a missing answer).
    ns = fresh_namespace()
    try:
        _exec(exercise.student_source, ns, ex_label)
    except Exception:
        pass
    with pytest.raises(Exception):
        _exec(exercise.check_source, ns, ck_label)
        pytest.fail(
            f"{exercise.id}: the check cell (cell {exercise.check_index}) passes on the student "
            "copy; "
            "it must raise when the answer is missing"
        )


def test_every_check_of_the_library_is_run_by_an_exercise_found_here():
    """``test_exercise`` runs each check cell on the solution and on the student copy: every
    ``check_*`` of ``checks`` must be called in the check cell of an exercise
    that the convention finds (a check called elsewhere is never tried on a stub)."""
    import checks as package

    checks = {n for n, f in vars(package).items() if n.startswith("check_") and callable(f)}
    found = [p.values[1] for p in _collect_exercises()]
    assert not [e for e in found if isinstance(e, Exception)], found
    called = {n for e in found for n in re.findall(r"\b(check_\w+)\(", e.check_source)}
    assert checks <= called, f"checks no exercise's check cell calls: {sorted(checks - called)}"


# --------------------------------------------------------------------------- (c)


def test_committed_assignments_are_fresh():
    r = _run_tool("--check")
    assert r.returncode == 0, f"{r.stdout}{r.stderr}"


# --------------------------------------------------------------------------- (d)

# The student copies run top to bottom: every cell but the exercises and their checks, with the
# exercises unanswered. Smaller runs than the lessons' (the parameters cell's values, appended to
# it), each chapter in well under a minute on two cores.
SMALL_RUNS = {
    "00_model_and_one_request": "max_new_tokens = 8",
    "01_memory_bound_inference":
        "batch_sizes = [1, 2]\ncontext = 16\nprefill_tokens = 16\nrepeat = 1",
    "02_static_batching": "n_requests = 4\nmax_new_tokens = 8\nn_sequential = 1",
    "03_dynamic_batching": "n_requests = 4\nmax_new_tokens = 8",
    "04_continuous_batching": "n_requests = 4\nmax_new_tokens = 8",
    "05_prefill_decode_chunked": "n_chat = 2\nn_long = 1\nlong_len = 64\nbudget = 32\n"
                                 "max_new_tokens = 8",
    "06_padding_packing_ragged": "n_prompts = 3",
    "07_paged_kv_cache": "n_requests = 4\nmax_new_tokens = 8\nbudget_tokens = 128",
    "08_metrics_and_tradeoffs": "n_requests = 6\nmax_new_tokens = 8\nmax_batch = 4",
    "09_cuda_engine": "n_check = 4",  # fewer would not preempt in its 18 blocks
}


@pytest.mark.parametrize("stem", SMALL_RUNS)
def test_student_copy_runs_apart_from_its_exercises(stem, monkeypatch):
    import os

    from nbclient import NotebookClient

    nb = ma.read_notebook(REPO_ROOT / "assignments" / f"{stem}.ipynb")
    exercises = ma.find_exercises(ma.read_notebook(NOTEBOOKS / f"{stem}.ipynb"), stem)
    params = next(c for c in nb.cells if c.source.startswith("# Parameters"))
    params.source += "\n" + SMALL_RUNS[stem]
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH",
                       os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    failed = {i: f"{o.ename}: {o.evalue}" for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"}
    exercise_cells = {i for e in exercises for i in (e.cell_index, e.check_index)}
    stray = {i: err for i, err in failed.items() if i not in exercise_cells}
    assert not stray, (f"assignments/{stem}.ipynb: cells outside the exercises fail when the "
                       f"exercises are unanswered (use the library's version after a check): "
                       f"{stray}")
    passed = [e.id for e in exercises if e.check_index not in failed]
    assert not passed, f"check cells that pass on an unanswered exercise: {passed}"
