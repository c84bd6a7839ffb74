"""The sliders as a learner meets them: JupyterLab started as ``make lab`` starts it, in a real
(headless) Chromium driven by Playwright. A notebook opens clean (the stored slider output is a
one-line hint, the tab is not marked unsaved, no news pop-up), runs with Run All, and a moved
slider's Run says what it computes (where that lasts long enough to be seen), then shows the new
setting's text and plot, as read from the page. Notebooks run from a temporary copy, so nothing
here writes to notebooks/.

Skipped, with the reason, where Playwright or Chromium is missing (``make test`` installs both
when it can: Playwright with ``make venv``, Chromium with ``make browser``). The first tests
check the stored notebooks without a browser.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from course_lib.lab import widgets

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIRS = (REPO_ROOT / "notebooks", REPO_ROOT / "assignments")
EXPLORER_CALL = re.compile(r"^\w+_explorer\(", re.MULTILINE)
REPRS = ("interactive(children=", "<function ")
NEWS = "official Jupyter news"

S = 1000  # Playwright's timeouts are in milliseconds


def notebooks():
    return sorted(p for d in NOTEBOOK_DIRS for p in d.glob("*.ipynb"))


def _text(output) -> str:
    text = output.get("text", "") or output.get("data", {}).get("text/plain", "")
    return "".join(text) if isinstance(text, list) else text


# ------------------------------------------------------------------ the stored notebooks
@pytest.mark.parametrize("path", notebooks(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_names_the_installed_kernel(path):
    """JupyterLab rewrites a notebook's kernelspec that differs from the kernel it starts (here the
    display name), which marks the notebook unsaved as soon as it opens."""
    from jupyter_client.kernelspec import KernelSpecManager

    stored = json.loads(path.read_text())["metadata"]["kernelspec"]
    spec = KernelSpecManager().get_kernel_spec(stored["name"])
    assert stored == {"display_name": spec.display_name, "language": spec.language,
                      "name": stored["name"]}


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stored_slider_outputs_are_a_hint(path):
    """A slider cell's stored output, where it has one, is the one-line hint (with or without the
    widget's view); no output anywhere is a widget's or a function's repr."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    for cell in cells:
        for out in cell.get("outputs", []):
            assert not _text(out).startswith(REPRS), (path.name, _text(out)[:80])
    for cell in (c for c in cells if EXPLORER_CALL.search("".join(c["source"]))):
        for out in cell.get("outputs", []):
            assert out["output_type"] == "execute_result", (path.name, out["output_type"])
            assert _text(out) == widgets.HINT


def _requests(n=5, max_new=6):
    import torch

    from course_lib.requests import Request

    g = torch.Generator().manual_seed(0)
    return [Request(f"r{i}", torch.randint(3, 1000, (3 + 2 * i,), generator=g).tolist(), max_new)
            for i in range(n)]


EXPLORERS = {  # an explorer on the tiny model, the value its first slider is set to, and what a
    # click says while it runs and then shows
    "engine": (lambda m, r: widgets.engine_explorer(m, r, ("static", "continuous"), (1, 2, 4)),
               4, r"Running static and continuous on 5 requests with max_batch=4\b",
               r"static, max_batch=4: [\d.]+ tok/s.*\ncontinuous, max_batch=4: [\d.]+ tok/s"),
    "budget": (lambda m, r: widgets.budget_explorer(m, r, budgets=(16, 32, 64)), 32,
               r"with a budget of 32 tokens per step", r"^budget 32 tokens/step: "),
    "block size": (lambda m, r: widgets.block_size_explorer(m, r, sizes=(1, 4, 16)), 4,
                   r"with blocks of 4 tokens", r"^blocks of 4 tokens: \d+ blocks, "),
}


def _click(ui, slider, value, capsys, monkeypatch) -> tuple[str, str]:
    """Set ``slider`` to ``value`` and click Run: (what was shown before the result cleared it,
    what is shown after)."""
    slider.value = value
    shown_before_clearing = []
    monkeypatch.setattr(widgets, "clear_output",
                        lambda wait=False: shown_before_clearing.append(capsys.readouterr().out))
    ui.children[-2].click()
    assert len(shown_before_clearing) == 1, "the click did not get to its result"
    erase = "\x1b[2K\r"     # what IPython's clear_output writes to a terminal, not shown in a page
    said, shown = shown_before_clearing.pop(), capsys.readouterr().out
    return said.replace(erase, ""), shown.replace(erase, "")


@pytest.mark.parametrize("kind", list(EXPLORERS))
def test_a_click_says_what_runs_then_the_result_replaces_it(tiny, kind, capsys, monkeypatch):
    """In the kernel, without a browser: the status line comes first and is cleared before the
    result; a second click on the same setting draws from the cache."""
    import matplotlib

    matplotlib.use("Agg")
    make, value, running, result = EXPLORERS[kind]
    ui = make(tiny, _requests())
    bundle = ui._repr_mimebundle_()
    assert bundle["text/plain"] == widgets.HINT
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert ui.children[-2].description == widgets.RUN
    for says in (running, r"Drawing .*\(run before\)"):  # the second: the same, cached
        said, shown = _click(ui, ui.children[0], value, capsys, monkeypatch)
        assert re.search(says, said, re.MULTILINE), said
        assert re.search(result, shown, re.MULTILINE | re.DOTALL), shown
        assert not re.search(says, shown, re.MULTILINE), "the status line was not replaced"
        assert str(value) in plt_titles()


def test_the_stored_ladder_s_slider_draws_the_chosen_rung(capsys, monkeypatch):
    """Chapter 09's slider over a stored GPU ladder: a click names the rung, then prints that
    rung's own metrics and draws its steps."""
    import matplotlib
    import matplotlib.pyplot as plt

    from course_lib.lab.nbtools import load_result

    matplotlib.use("Agg")
    result = load_result("ladder09_anyscale_llama-1b-dummy_nvidia-h200.json")
    ui = widgets.ladder_explorer(result)
    assert ui._repr_mimebundle_()["text/plain"] == widgets.HINT
    rungs = [r for r in result["runs"] if "error" not in r and r.get("steps")]
    for run in (rungs[1], rungs[-1]):
        said, shown = _click(ui, ui.children[0], run["rung"], capsys, monkeypatch)
        assert said.startswith(f"Drawing the stored steps of the {run['rung']} rung"), said
        tps = run["metrics"]["output_tokens_per_s"]
        assert shown.startswith(f"{run['rung']}: {tps:.0f} tok/s, {run['metrics']['steps']} steps")
        assert "Drawing" not in shown, "the status line was not replaced"
        assert len(plt.gcf().axes) == 2, "no steps drawn (steps and their batch size)"
        plt.close("all")


def test_the_operating_point_slider_simulates_the_chosen_point(capsys, monkeypatch):
    """Chapter 08's slider: a click says what it simulates, then prints the chosen point with and
    without admission, and draws the curve and the queue; overloaded, admission control keeps a
    larger share of the requests within the TTFT target than admitting everything."""
    import matplotlib
    import matplotlib.pyplot as plt
    from transformers import LlamaConfig

    from course_lib.measure.simulator import CostBook
    from course_lib.measure.tradeoffs import simulated
    from course_lib.model.llama import LlamaShape
    from course_lib.requests import Request

    matplotlib.use("Agg")
    shape = LlamaShape.from_config(LlamaConfig(hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, vocab_size=100))
    reqs = [Request(f"r{i}", [3] * (4 + i % 7), max_new_tokens=2 + (5 * i) % 11)
            for i in range(24)]
    run = simulated(CostBook.floor("slow card", 1e6, 1e8), shape, 2, reqs, block_size=4)
    ui = widgets.operating_point_explorer(run, rates=[1, 4, 16], batches=[2, 8],
                                          ttft_slos=[0.5, 2.0])
    rate, max_batch, slo = ui.children[:3]
    max_batch.value, slo.value = 2, 0.5
    said, shown = _click(ui, rate, 16, capsys, monkeypatch)
    assert said.startswith("Simulating 16 req/s with max_batch=2, with and without admission "
                           "for a TTFT target of 0.5 s, and the curve over 3 rates"), said
    setting, free, gated = shown.splitlines()[:3]
    assert setting == "16 req/s, max_batch=2, TTFT target 0.5 s:", shown
    assert free.strip().startswith("admit everything:") and "refused 0," in free, shown
    assert gated.strip().startswith("admission control:"), shown
    assert "Simulating" not in shown, "the status line was not replaced"
    within = [float(re.search(r"\((\d+)% within the SLO\)", line).group(1))
              for line in (free, gated)]
    assert within[1] > within[0], shown            # overloaded: admission keeps more on time
    assert len(plt.gcf().axes) == 2, "no curve and queue drawn"
    plt.close("all")


def plt_titles() -> str:
    import matplotlib.pyplot as plt

    titles = " ".join(ax.get_title() for ax in plt.gcf().axes)
    plt.close("all")
    return titles


def test_course_settings_turn_the_news_off():
    overrides = json.loads((REPO_ROOT / "jupyter/settings/overrides.json").read_text())
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    assert f"--LabApp.app_settings_dir={REPO_ROOT / 'jupyter/settings'}" in lab_command()


# ------------------------------------------------------------------ JupyterLab in Chromium
def lab_command() -> list[str]:
    """The command line of ``make lab`` (its recipe printed by ``make -n``)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed: cannot read how `make lab` starts JupyterLab")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    dry = subprocess.run(["make", "-n", "-s", "lab"], cwd=REPO_ROOT, env=env, text=True,
                         capture_output=True, check=True).stdout
    lines = [ln.strip() for ln in dry.replace("\\\n", " ").splitlines()]
    return shlex.split(next(ln for ln in lines if ln.startswith("jupyter lab")))


def chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium found (as root, `make browser` installs it with apt-get; "
                "or set CHROMIUM to a Chromium or Chrome executable)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, token: str, path: str, method: str = "GET"):
    req = urllib.request.Request(f"{base}/api/{path}", method=method,
                                 headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def lab():
    """JupyterLab (``make lab``'s command line) on a copy of the notebooks, with fresh user
    settings; yields (base URL, token). Stops its kernels and itself afterwards."""
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (make venv)")
    chromium()
    with tempfile.TemporaryDirectory(prefix="course-browser-test-") as tmp:
        yield from _serve(Path(tmp))


def _serve(tmp: Path):
    shutil.copytree(REPO_ROOT / "notebooks", tmp / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    port, token = free_port(), "course-browser-test"
    # make lab's command line, run where notebooks/ is the copy
    cmd = [sys.executable, "-m", "jupyter", *lab_command()[1:], "--no-browser",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={token}",
           f"--LabApp.user_settings_dir={tmp / 'user-settings'}",
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    with open(tmp / "jupyter.log", "w") as log:
        server = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp / "jupyter.log").read_text()[-3000:]
            try:
                api(base, token, "status")
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not answer within 120 s"
                time.sleep(0.5)
        yield base, token
    finally:
        try:
            for kernel in api(base, token, "kernels"):
                api(base, token, f"kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), headless=True)
        try:
            yield b
        finally:
            b.close()


class Notebook:
    """One notebook open in JupyterLab, driven as a learner drives it."""

    def __init__(self, page, name):
        self.page, self.name = page, name

    def wait_idle(self, timeout_s: float):
        self.page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']",
                                    timeout=timeout_s * S)

    def tab_dirty(self) -> bool:
        tab = self.page.locator(".lm-TabBar-tab", has_text=self.name)
        return "jp-mod-dirty" in (tab.get_attribute("class") or "")

    def run_all(self, timeout_s: float):
        """Run > Run All Cells; returns once the slider cell has run and no cell is queued."""
        page = self.page
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        page.wait_for_function(
            """() => document.querySelector('.widget-interact') &&
                ![...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
                    .some(e => e.textContent.includes('*'))""",
            timeout=timeout_s * S, polling=500)
        self.wait_idle(timeout_s)


class Slider:
    """The slider cell's widget: its sliders, Run button and output area."""

    def __init__(self, page):
        self.page = page
        self.box = page.locator(".widget-interact").first
        self.out = self.box.locator(".widget-output")

    def move(self, index: int, steps: int, expected: str) -> str:
        """Move slider ``index`` by ``steps`` with the arrow keys; its readout once it shows
        ``expected`` (it follows the keys within a moment), or as it stands after 10 s."""
        handle = self.box.locator(".noUi-handle").nth(index)
        handle.focus()
        for _ in range(abs(steps)):
            self.page.keyboard.press("ArrowRight" if steps > 0 else "ArrowLeft")
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        readout = self.box.locator(".widget-readout").nth(index)
        with contextlib.suppress(PlaywrightTimeout):
            readout.filter(has_text=re.compile(f"^{re.escape(expected)}$")).wait_for(
                timeout=10 * S)
        return readout.inner_text()

    def click_run(self):
        self.box.get_by_role("button", name=widgets.RUN, exact=True).click()

    def text(self) -> str:
        return self.out.inner_text()

    def image(self, timeout_s: float = 120) -> str:
        """The plot's data URL, once the output shows one (the text comes first, the figure
        after it); a plot that never comes fails with what the output shows instead."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        out = self.out.element_handle()
        try:
            self.page.wait_for_function("el => el.querySelector('img')", arg=out,
                                        timeout=timeout_s * S, polling=500)
        except PlaywrightTimeout:
            pytest.fail(f"no plot {timeout_s:.0f} s after the text; the output holds "
                        f"{out.inner_html()[-1500:]!r}")
        return out.query_selector("img").get_attribute("src")

    def wait_text(self, pattern: str, timeout_s: float):
        self.page.wait_for_function(
            "([el, re]) => new RegExp(re, 'm').test(el.innerText)", arg=[self.out.element_handle(),
                                                                    pattern],
            timeout=timeout_s * S, polling="raf")


# name, slider moves (index, steps), what the output says while computing and after, for the
# new setting; the readout expected after the move.
CASES = {
    "01_memory_bound_inference.ipynb": {
        "move": (0, +1), "readout": "4", "running": r"Timing one decode step at B=16\b",
        "result": r"^B=16: step [\d.]+ ms", "bar": False, "cold": r"^B=8: step"},
    "04_continuous_batching.ipynb": {
        "move": (0, +1), "readout": "16",
        "running": r"Running static and continuous .* max_batch=16\b",
        "result": (r"static, max_batch=16: [\d.]+ tok/s[\s\S]*"
                   r"continuous, max_batch=16: [\d.]+ tok/s"),
        "bar": True, "cold": r"continuous, max_batch=8: [\d.]+ tok/s"},
    "05_prefill_decode_chunked.ipynb": {
        "move": (0, +1), "readout": "256",
        "running": r"Running the chunked engine on \d+ requests with a budget of 256 tokens",
        "result": r"^budget 256 tokens/step: longest wait between two tokens [\d.]+ s",
        "bar": True, "cold": r"^budget 128 tokens/step: "},
    "07_paged_kv_cache.ipynb": {
        "move": (0, +1), "readout": "64",
        "running": r"Running the paged engine on \d+ requests with blocks of 64 tokens",
        "result": r"^blocks of 64 tokens: \d+ blocks, [\d.]+% of the reserved places empty",
        "bar": True, "cold": r"^blocks of 16 tokens: "},
    # these two draw from a cache or a stored run: the status line may last less than a frame
    "08_metrics_and_tradeoffs.ipynb": {
        "move": (0, +1), "readout": "6", "running": None,
        "result": (r"^6 req/s, max_batch=8, TTFT target 1.5 s:\n +admit everything: +\d+ tok/s"
                   r".*\n +admission control: +\d+ tok/s"),
        "bar": False, "cold": r"^4 req/s, max_batch=8, TTFT target 1.5 s:"},
    "09_cuda_engine.ipynb": {
        "move": (0, +1), "readout": "fast:watermark=0.05", "running": None,
        "result": r"^fast:watermark=0.05: \d+ tok/s, \d+ steps", "bar": False,
        "cold": r"^fast: \d+ tok/s, \d+ steps"},
}


# chapters 07-09 run in test_browser_later.py: a module of their own, so that the two halves can
# run on two workers
LATER = ("07_paged_kv_cache.ipynb", "08_metrics_and_tradeoffs.ipynb", "09_cuda_engine.ipynb")


@pytest.mark.parametrize("name", [n for n in CASES if n not in LATER])
def test_slider_in_the_browser(lab, browser, name):
    use_the_slider(lab, browser, name)


def use_the_slider(lab, browser, name):
    """Open ``name`` in JupyterLab, Run All, Run its slider as stored, move it, Run again."""
    base, token = lab
    case = CASES[name]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    timings = {}
    try:
        t0 = time.monotonic()
        page.goto(f"{base}/lab/tree/{name}?reset&token={token}")
        nb = Notebook(page, name)
        nb.wait_idle(120)
        # opens clean: the stored slider output is the hint, no repr, not marked unsaved, no news
        # (JupyterLab attaches the cells over a few seconds)
        page.wait_for_function(
            "hint => document.querySelector('.jp-Notebook').textContent.includes(hint)",
            arg=widgets.HINT, timeout=60 * S, polling=500)
        page.wait_for_timeout(2 * S)
        text = page.locator(".jp-Notebook").text_content()
        assert not any(r in text for r in REPRS)
        assert not nb.tab_dirty(), "the notebook is marked unsaved before anything ran"
        assert page.get_by_text(NEWS).count() == 0, "the Jupyter news pop-up is shown"
        timings["open"] = time.monotonic() - t0

        t0 = time.monotonic()
        nb.run_all(timeout_s=1200)
        timings["run all"] = time.monotonic() - t0
        tracebacks = [t for t in page.locator(".jp-OutputArea-output").all_inner_texts()
                      if "Traceback" in t]
        assert not tracebacks, tracebacks[0][-2000:]

        slider = Slider(page)
        slider.box.wait_for(timeout=30 * S)
        assert slider.text().strip() == "", "the slider ran before its button was clicked"

        # Run at the stored setting, then move the slider and Run again
        t0 = time.monotonic()
        slider.click_run()
        slider.wait_text(case["cold"], 600)
        timings["first run"] = time.monotonic() - t0
        before = slider.image()
        assert before, "no plot after the first Run"

        index, steps = case["move"]
        assert slider.move(index, steps, case["readout"]) == case["readout"]
        t0 = time.monotonic()
        slider.click_run()
        if case["running"]:
            slider.wait_text(case["running"], 30)
            timings["says what runs"] = time.monotonic() - t0
        if case["bar"]:
            slider.out.locator(".progress-bar").first.wait_for(timeout=30 * S)
        slider.wait_text(case["result"], 600)
        timings["new setting"] = time.monotonic() - t0
        slider.page.wait_for_function(
            "([el, src]) => { const i = el.querySelector('img'); return i && i.src != src; }",
            arg=[slider.out.element_handle(), before], timeout=30 * S)
        status = case["running"] or r"^(Drawing|Simulating) .* \.\.\.$"
        assert not re.search(status, slider.text(), re.MULTILINE), "the status line stayed"
        assert not re.search(case["cold"], slider.text(), re.MULTILINE), (
            "the old setting's text stayed")
        assert slider.out.locator("img").count() == 1
    finally:
        print(f"\n{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        page.close()


def test_no_stored_output_holds_a_progress_bar():
    """A progress bar stored in a notebook is frozen where the run left it ("Loading weights:
    0%"): the library loads quietly, and no stored output may hold one."""
    import re

    import nbformat
    bar = re.compile(r"\d+%\|.*\|\s*\d+/\d+")
    found = []
    for f in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        for i, c in enumerate(nbformat.read(f, 4).cells):
            for o in c.get("outputs", []) if c.cell_type == "code" else []:
                text = o.get("text", "") if o.output_type == "stream" else str(
                    o.get("data", {}).get("text/plain", ""))
                if bar.search(text):
                    found.append(f"{f.name} cell {i}: {text[:60]!r}")
    assert not found, "\n".join(found)


def test_no_notebook_prose_names_a_commit():
    """History (which commit ran what) belongs in bench/FINDINGS.md, not in a lesson's prose."""
    import re

    import nbformat
    commit = re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
    found = [f"{f.name} cell {i}: {commit.findall(c.source)}"
             for f in sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
             for i, c in enumerate(nbformat.read(f, 4).cells)
             if c.cell_type == "markdown" and commit.search(c.source)]
    assert not found, "\n".join(found)
