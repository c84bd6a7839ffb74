#!/usr/bin/env python3
"""Time the course's sliders as a learner's clicks run them, for the table in the README.

For each notebook this starts a kernel in notebooks/ (inline plots, as in JupyterLab), runs the
cells the slider needs (its set-up cells, see SETUP, or every cell before it), builds the slider
with the notebook's own call, then clicks Run at each setting of CLICKS in turn and prints how
long each click took until its result was drawn (seconds), with the machine's load average: other
work on the same cores slows every click. A setting met before comes from the cache.

Usage::

    python tools/slider_timings.py              # every notebook of CLICKS
    python tools/slider_timings.py 01 04        # some of them
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import nbformat
from jupyter_client.manager import start_new_kernel

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO_ROOT / "notebooks"
CALL = re.compile(r"^\w+_explorer\(", re.MULTILINE)

# Cells (indices) that define what the slider's call uses; a notebook not listed runs every cell
# before its slider cell.
SETUP = {"01": [1, 2, 9, 13], "02": [1, 2, 3], "03": [1, 2, 3], "04": [1, 2, 3], "05": [1, 2, 3],
         "07": [1, 2, 3]}
# Per notebook: the values of the sliders, one tuple per click (the first is the stored setting).
CLICKS = {
    "01": [(3,), (4,), (4,), (6,)],
    "02": [(4,), (16,), (16,)],
    "03": [(8,), (16,), (16,)],
    "04": [(8,), (16,), (16,), (2,)],
    "05": [(128,), (16,), (1024,), (1024,)],
    "07": [(16,), (1,), (1,)],
    "08": [(4, 8, 1.5), (12, 8, 1.5), (12, 8, 1.5), (4, 32, 1.5)],
}

CLICK = """
import json as _json, time as _time
_ui = {call}
_sliders, _button = _ui.children[:-2], _ui.children[-2]
_times = []
for _setting in {clicks!r}:
    for _s, _v in zip(_sliders, _setting):
        _s.value = _v
    _t = _time.perf_counter()
    _button.click()
    _times.append([list(_setting), round(_time.perf_counter() - _t, 2)])
print("TIMES", _json.dumps([[_s.description for _s in _sliders], _times]))
"""


def run(kc, code: str, timeout: float = 3600) -> str:
    out = []

    def keep(msg):
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("\n".join(msg["content"]["traceback"]))

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=keep)
    if reply["content"]["status"] != "ok":
        raise RuntimeError("".join(out)[-3000:])
    return "".join(out)


def time_notebook(key: str) -> dict:
    path = next(NOTEBOOKS.glob(f"{key}_*.ipynb"))
    cells = nbformat.read(path, as_version=4).cells
    at = next(i for i, c in enumerate(cells) if c.cell_type == "code" and CALL.search(c.source))
    setup = SETUP.get(key, [i for i in range(at) if cells[i].cell_type == "code"])
    found = CALL.search(cells[at].source)
    before, call = cells[at].source[:found.start()], cells[at].source[found.start():]
    km, kc = start_new_kernel(cwd=str(NOTEBOOKS))
    try:
        run(kc, "%matplotlib inline")
        for i in setup:
            run(kc, cells[i].source)
        run(kc, before)                     # the slider cell's own imports, before its call
        line = run(kc, CLICK.format(call=call, clicks=CLICKS[key]))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    names, times = json.loads(line.split("TIMES", 1)[1])
    return {"notebook": path.name, "call": call.strip(), "sliders": names, "clicks": times,
            "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", default=list(CLICKS), help="e.g. 01 04")
    for key in ap.parse_args(argv).notebooks:
        print(json.dumps(time_notebook(key)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
