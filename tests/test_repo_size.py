"""The repository stays lean: what the notebooks show (stored results, figures, executed notebooks
and their student copies) fits in 6 MB; every stored result says where it came from, is named in
bench/README.md and is read by something."""
import gzip
import json
import re
import shutil
import subprocess

import pytest

from course_lib.lab import nbtools
from course_lib.lab.nbtools import RESULTS, ROOT

LIMIT = 6 * 2**20
TRACKED = ("bench/results", "vis", "notebooks", "assignments")


def tracked_files(*paths: str) -> list:
    """The files git tracks under ``paths`` (skips outside a git checkout)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    out = subprocess.run(["git", "ls-files", "-z", "--", *paths], check=False, cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return [ROOT / p for p in out.stdout.split("\0") if p]


def test_stored_results_figures_and_notebooks_fit_in_6_mb():
    files = tracked_files(*TRACKED)
    assert any(f.parent == RESULTS for f in files), "bench/results/ should be tracked"
    sizes = {f.relative_to(ROOT).as_posix(): f.stat().st_size for f in files if f.exists()}
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    assert sum(sizes.values()) <= LIMIT, (
        f"{sum(sizes.values()) / 2**20:.1f} MB tracked under {', '.join(TRACKED)} (limit "
        f"{LIMIT / 2**20:.0f} MB); largest: {largest}. Keep only what a notebook, figure or test "
        "reads, and gzip large JSON (read through course_lib.lab.nbtools.load_result)")


def test_every_stored_result_records_its_card_versions_commit_and_command():
    files = [f for f in tracked_files("bench/results") if f.name.endswith((".json", ".json.gz"))]
    assert files
    for f in files:
        raw = f.read_bytes()
        r = json.loads(gzip.decompress(raw) if f.suffix == ".gz" else raw)
        v = r["versions"]
        where = r.get("device") or v.get("gpu") or v.get("cpu")    # the card, or the CPU it ran on
        assert where and v["torch"] and v["course_lib_commit"], f
        assert r["command"].startswith(("python", "COURSE_ROOT=")), f


def test_stored_results_are_read_gzipped_or_not_in_the_order_of_their_names(tmp_path, monkeypatch):
    monkeypatch.setattr(nbtools, "RESULTS", tmp_path)
    (tmp_path / "run_b.json.gz").write_bytes(gzip.compress(b'{"x": 2}'))
    (tmp_path / "run_a.json").write_text('{"x": 1}')
    (tmp_path / "run_c.json").write_text('{"x": 3}')
    (tmp_path / "other.json").write_text('{"x": 0}')
    assert nbtools.stored_results("run_") == [{"x": 1}, {"x": 2}, {"x": 3}]
    assert nbtools.load_result("run_b.json") == {"x": 2}


def test_slimming_keeps_the_named_fields_and_rounds_the_runs_only(tmp_path):
    """``python -m bench.store`` on a gzipped run: each request keeps ``--request-fields``, the
    runs' numbers are rounded, what describes the run (its command, versions) is untouched, and
    ``slimmed`` says what was done."""
    from bench.store import main
    run = {"requests": [{"id": "a", "arrival_s": 0.123456789, "ttft_s": 0.5}],
           "steps": [{"start_s": 1.0000004, "rows": 3}]}
    path = tmp_path / "r.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"runs": [run], "peak": 1.23456789}).encode()))
    main([str(path), "--drop", "--request-fields", "id", "arrival_s", "--decimals", "6"])
    got = json.loads(gzip.decompress(path.read_bytes()))
    assert got["runs"][0]["requests"] == [{"id": "a", "arrival_s": 0.123457}]
    assert got["runs"][0]["steps"] == [{"start_s": 1.0, "rows": 3}]
    assert got["peak"] == 1.23456789
    assert "rounded to 6 decimals" in got["slimmed"] and "id, arrival_s" in got["slimmed"]


def _named_in_the_bench_readme() -> list:
    """The result-file patterns of bench/README.md's table, as regular expressions."""
    table = [line.split("|")[1] for line in (ROOT / "bench" / "README.md").read_text().splitlines()
             if line.startswith("| `")]
    out = []
    for cell in table:
        for name in re.findall(r"`([^`]+)`", cell):     # <field>, * and [optional] parts
            parts = re.split(r"(<[^>]*>|\*|\[|\])", name)
            rx = {"*": "[^/]*", "[": "(?:", "]": ")?"}
            out.append(re.compile("".join(
                "[^/]+" if t.startswith("<") else rx.get(t, re.escape(t)) for t in parts)))
    return out


def test_every_stored_result_is_in_the_bench_readme_and_read_by_something():
    files = [f.relative_to(RESULTS).as_posix() for f in tracked_files("bench/results")
             if f.name.endswith((".json", ".json.gz"))]
    patterns = _named_in_the_bench_readme()
    assert not [f for f in files if not any(p.fullmatch(f) for p in patterns)], (
        "stored results that bench/README.md's table does not name")
    # what the notebooks, tests, library and figures read: a whole file name, a prefix passed to
    # stored_results, or a name template up to its first field ("decode_step_{m}_...")
    code = "\n".join(p.read_text() for d in ("notebooks", "tests", "course_lib", "vis")
                     for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".ipynb"))
    q = r"""\\?["']"""                                  # a quote, escaped inside a notebook's JSON
    names = set(re.findall(q + r"((?:cpu/)?[\w.-]+\.json(?:\.gz)?)" + q, code))
    starts = set(re.findall(r"stored_results\(" + q + r"([\w./-]+)" + q, code))
    starts |= set(re.findall(q + r"((?:cpu/)?[\w.-]{3,}_)\{", code))   # up to "_{field}"
    unread = [f for f in files if f not in names and f.removesuffix(".gz") not in names
              and not any(f.startswith(s) for s in starts)]
    assert not unread, f"stored results nothing reads (keep only what is read): {unread}"
