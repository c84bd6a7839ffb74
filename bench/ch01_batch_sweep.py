"""Chapter 01's measurement on any device: measured peaks, then one decode step timed at each
batch size (and one prefill step), stored as JSON for the notebook to show.

    python -m bench ch01_batch_sweep --model llama-1b-dummy --dtype bfloat16 --device cuda \\
        --batch 1 2 4 8 16 32 64 128 256 512 --context 512 --out bench/results
"""
import argparse
import re
import sys
from pathlib import Path

from bench import command
from course_lib.bench import save_result
from course_lib.measure import roofline
from course_lib.model import models
from course_lib.model.llama import Llama


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    loaded = models.load(a.model, dtype=a.dtype, device=a.device)
    model = Llama.from_hf(loaded.model)
    peaks = roofline.measure_peaks(a.device, model.dtype, refresh=True)
    rows = roofline.batch_sweep(model, peaks, a.batch, a.context, a.prefill, a.repeat,
                                progress=True)
    if a.device.startswith("cuda"):          # the same steps without Python's launch overhead
        rows += roofline.batch_sweep(model, peaks, a.batch, a.context, a.prefill, a.repeat,
                                     progress=True, graph=True)
    slug = re.sub(r"[^a-z0-9]+", "-", peaks.device.lower()).strip("-")
    path = Path(a.out) / f"ch01_batch_sweep_{a.model}_{slug}.json"
    save_result({"model": a.model, "dtype": a.dtype, "device": vars(peaks), "rows": rows},
                path, command("ch01_batch_sweep", argv))
    print(f"{peaks.device}: {peaks.bandwidth / 1e9:.0f} GB/s, {peaks.flops / 1e12:.1f} TFLOP/s")
    print(f"{'mode':>6} {'kind':>8} {'B':>5} {'step ms':>9} {'tok/s':>10} {'MBU':>6} {'MFU':>6}")
    for r in rows:
        print(f"{r['mode']:>6} {r['kind']:>8} {r['batch']:>5} {r['step_s'] * 1e3:9.3f} "
              f"{r['tokens_per_s']:10.0f} {100 * r['mbu']:5.1f}% {100 * r['mfu']:5.1f}%")
    print("wrote", path)


if __name__ == "__main__":
    main()
