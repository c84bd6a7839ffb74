"""One whole decode step of the paged engine's fast path, per batch size: the CUDA graph replay
on the GPU (events), the whole step as the engine sees it (host fill + one copy + replay + the
tokens back), the same step launched eagerly, kernel by kernel, and the graph replay of the model
without the fused elementwise kernels and stacked projections (``course_lib.kernels.fused``).
MBU = (weights + KV bytes the step must read) / time / measured copy bandwidth.

    python -m bench decode_step --model llama-1b-dummy --dtype bfloat16 --context 640 --out DIR
"""
import argparse
import copy
import dataclasses
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench import command
from course_lib.bench import save_result
from course_lib.engines.block_manager import BlockManager
from course_lib.kernels.cuda_graphs import DecodeGraphs
from course_lib.kernels.fused import OPS as FUSED_OPS
from course_lib.measure.roofline import measure_peaks, step_work, time_fn
from course_lib.model import models
from course_lib.model.kv_cache import PagedKVCache
from course_lib.model.llama import Llama


def events_ms(fn, repeat):
    """Median milliseconds of ``fn()`` on the GPU, timed with CUDA events (no warm-up here)."""
    return time_fn(fn, "cuda", repeat=repeat, warmup=0) * 1e3


def wall_ms(fn, repeat):
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def parse_knobs(text: str) -> dict:
    """Settings given as ``"a=1,b=2"``: ``{"a": 1, "b": 2}``."""
    return {k: int(v) for k, v in (x.split("=") for x in text.split(",") if x)}


def decoding_cache(shape, batch: int, context: int, block_size: int = 16, dtype=torch.bfloat16,
                   device="cuda"):
    """A paged cache of ``batch`` sequences of ``context`` tokens grown side by side (their
    blocks scattered, as in serving), each about to decode its next token: ``(cache, rows for
    DecodeGraphs.step, blocks per sequence)``."""
    per_seq = -(-(context + 1) // block_size)
    cache = PagedKVCache(shape, BlockManager(batch * per_seq, block_size), dtype, device)
    cache.grow_side_by_side(dict.fromkeys(range(batch), context + 1), chunk=block_size)
    return cache, [(1, context, cache.tables[i]) for i in range(batch)], per_seq


def decoding_batch(model_name: str, batch: int, context: int, block_size: int = 16,
                   dtype: str = "bfloat16"):
    """The model and ``decoding_cache`` for it: ``(model, cache, rows, blocks per sequence)``."""
    model = Llama.from_hf(models.load(model_name, dtype=dtype, device="cuda").model)
    return model, *decoding_cache(model.shape, batch, context, block_size, model.dtype)


class HalvesDecodeGraphs(DecodeGraphs):
    """Buckets of ``split_from`` sequences and up as two halves on two CUDA streams: one half's
    decode attention can run beside the other half's matmuls (each half reads all the weights)."""

    def __init__(self, model, *args, split_from: int, **kwargs):
        self.split_from = split_from
        self.side = torch.cuda.Stream() if model.device.type == "cuda" else None
        super().__init__(model, *args, **kwargs)

    def hidden(self, tokens, nb: int):
        if nb < self.split_from:
            return super().hidden(tokens, nb)
        h = nb // 2
        if self.side is None:                         # no streams: one half, then the other
            return torch.cat([self.rows(tokens, 0, h), self.rows(tokens, h, nb)])
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)                   # the side stream starts after the inputs
        first = self.rows(tokens, 0, h)
        with torch.cuda.stream(self.side):
            second = self.rows(tokens, h, nb)
        main.wait_stream(self.side)                   # and rejoins before the logits
        second.record_stream(main)
        return torch.cat([first, second])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-1b-dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--context", type=int, default=640, help="tokens cached per sequence")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256, 512])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--knobs", default="",
                   help="decode kernel settings, e.g. block_n=32,num_warps=2")
    p.add_argument("--blas", default=None, choices=["cublas", "cublaslt"],
                   help="the BLAS library PyTorch's matmuls call "
                        "(torch.backends.cuda.preferred_blas_library): each has its own "
                        "heuristic for the thin matmuls of a decode step")
    p.add_argument("--split-from", type=int, default=None,
                   help="also time graphs that run buckets of this size and up as two halves on "
                        "two streams (HalvesDecodeGraphs), next to the whole-batch "
                        "graphs")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from course_lib.kernels import paged_decode
    paged_decode.TUNING.update(parse_knobs(a.knobs))
    if a.blas:                    # before any matmul: every graph captures that library's kernels
        torch.backends.cuda.preferred_blas_library(a.blas)
    B = max(a.batch)
    model, cache, rows, per_seq = decoding_batch(a.model, B, a.context, a.block_size, a.dtype)
    peaks = measure_peaks("cuda", model.dtype)
    plain = copy.copy(model)              # the same weights, unstacked, PyTorch elementwise ops
    plain.layers = [dataclasses.replace(w) for w in model.layers]
    unfused = DecodeGraphs(plain, cache, B, per_seq, graphs=True)
    model.use_ops(FUSED_OPS)
    graphs = DecodeGraphs(model, cache, B, per_seq, graphs=True)
    eager = DecodeGraphs(model, cache, B, per_seq, graphs=False)
    split = HalvesDecodeGraphs(model, cache, B, per_seq, graphs=True,
                               split_from=a.split_from) if a.split_from else None
    dtype_bytes = model.dtype.itemsize
    out = []
    for b in a.batch:
        nb = graphs.bucket(b)
        graphs.step(rows[:b])                       # fill the inputs once
        gpu = events_ms(graphs.graphs[nb].replay, a.repeat)
        unfused.step(rows[:b])
        gpu_unfused = events_ms(unfused.graphs[nb].replay, a.repeat)
        step = wall_ms(lambda: graphs.step(rows[:b]), a.repeat)
        eager_step = wall_ms(lambda: eager.step(rows[:b]), max(3, a.repeat // 4))
        w = step_work(model.shape, dtype_bytes, tokens=b, attended=b * (a.context + 1),
                      kv_read=b * a.context, logit_rows=b)
        row = {"batch": b, "bucket": nb, "context": a.context, "bytes": w.bytes, "flops": w.flops,
               "graph_gpu_ms": gpu, "graph_step_ms": step, "eager_step_ms": eager_step,
               "unfused_gpu_ms": gpu_unfused,
               "mbu_gpu": w.bytes / (gpu / 1e3) / peaks.bandwidth,
               "mbu_unfused": w.bytes / (gpu_unfused / 1e3) / peaks.bandwidth,
               "mbu_step": w.bytes / (step / 1e3) / peaks.bandwidth,
               "mbu_eager": w.bytes / (eager_step / 1e3) / peaks.bandwidth}
        if split is not None and nb >= a.split_from:
            split.step(rows[:b])
            row["split_gpu_ms"] = events_ms(split.graphs[nb].replay, a.repeat)
            row["mbu_split"] = w.bytes / (row["split_gpu_ms"] / 1e3) / peaks.bandwidth
            print(f"B={b:4d} two halves on two streams: replay {row['split_gpu_ms']:7.3f} ms "
                  f"MBU {row['mbu_split']:.0%}")
        out.append(row)
        print(f"B={b:4d} (graph {nb:4d}) | replay {gpu:7.3f} ms MBU {row['mbu_gpu']:.0%} | "
              f"unfused {gpu_unfused:7.3f} ms MBU {row['mbu_unfused']:.0%} | "
              f"step {step:7.3f} ms MBU {row['mbu_step']:.0%} | eager {eager_step:7.3f} ms "
              f"MBU {row['mbu_eager']:.0%}", flush=True)
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
    knobs = "_" + a.knobs.replace("=", "").replace(",", "_") if a.knobs else ""
    knobs += f"_{a.blas}" if a.blas else ""
    knobs += f"_split{a.split_from}" if a.split_from else ""
    save_result({"model": a.model, "dtype": a.dtype, "device": asdict(peaks),
                 "kernel": paged_decode.TUNING, "split_from": a.split_from,
                 "blas": str(torch.backends.cuda.preferred_blas_library()), "rows": out},
                Path(a.out) / f"decode_step_{a.model}_{name}{knobs}.json",
                command("decode_step", argv))


if __name__ == "__main__":
    main()
