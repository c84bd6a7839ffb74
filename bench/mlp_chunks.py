"""A mixed step's MLP in chunks of tokens, so that SwiGLU's intermediate stays in the L2 cache.
At 16,384 tokens the gate/up projection of llama-1b-dummy writes 537 MB a layer, SwiGLU reads it
back and writes 268 MB, the down projection reads that: about 1.6 GB of HBM traffic a layer that
a chunk of at most ~1,024 tokens (34 MB of gate/up output) could keep in the 50 MB L2, and bytes
not moved are also power not drawn, which a power-capped card turns into clock.

    python -m bench mlp_chunks --out DIR [--tokens 16384]

16 layers' MLPs (bf16, random weights scaled as a model's, each layer its own; the stacked
gate/up projection and the fused SwiGLU kernel, as the fast engine runs them), whole and in
chunks of 8192 down to 256 tokens, each timed as a CUDA graph (the GPU's time) and launched
eagerly (the host's launches too), in interleaved rounds so that the card's clock drifts alike
for all; the card's energy per pass from NVML. Checks every chunked result against the whole.
"""
import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import command
from bench.sustained_peak import event_ms

LAYERS, HIDDEN, INTER = 16, 2048, 8192
CHUNKS = (None, 8192, 4096, 2048, 1024, 512, 256)


def mlp(x, weights, out, chunk, silu_mul):
    """Every layer's MLP on ``x``'s rows ``chunk`` at a time (all at once for None) into ``out``
    (the layers are not chained: each reads ``x``, as each would read its own input)."""
    n = x.shape[0]
    step = chunk or n
    for w_gate_up, w_down in weights:
        for lo in range(0, n, step):
            gate, up = torch.matmul(x[lo:lo + step], w_gate_up.t()).chunk(2, dim=-1)
            torch.matmul(silu_mul(gate, up), w_down.t(), out=out[lo:lo + step])


@functools.cache
def _nvml_handle():
    """NVML and the first card's handle, initialised once; None without NVML."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:
        return None


def energy_mj():
    """The card's energy counter (mJ) through NVML, or None."""
    nvml = _nvml_handle()
    return nvml[0].nvmlDeviceGetTotalEnergyConsumption(nvml[1]) if nvml else None


def timed(fn, reps: int) -> tuple:
    """(ms per call by CUDA events, joules per call by NVML or None) over ``reps`` calls."""
    e0 = energy_mj()
    ms = event_ms(fn, reps)
    e1 = energy_mj()
    return ms / reps, (e1 - e0) / 1e3 / reps if e0 is not None else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args(argv)
    from course_lib.bench import save_result
    from course_lib.kernels.fused import silu_mul
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev, bf16 = "cuda", torch.bfloat16
    weights = [(torch.randn(2 * INTER, HIDDEN, device=dev).to(bf16) * 0.02,
                torch.randn(HIDDEN, INTER, device=dev).to(bf16) * 0.02) for _ in range(LAYERS)]
    x = torch.randn(a.tokens, HIDDEN, device=dev).to(bf16)
    outs = {c: torch.empty(a.tokens, HIDDEN, device=dev, dtype=bf16) for c in CHUNKS}
    graphs = {}
    for c in CHUNKS:
        mlp(x, weights, outs[c], c, silu_mul)                       # warm-up, outside capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            mlp(x, weights, outs[c], c, silu_mul)
        graphs[c] = g
        g.replay()
    torch.cuda.synchronize()
    errors = {c: ((outs[c].float() - outs[None].float()).abs().max()
                  / outs[None].float().abs().max()).item() for c in CHUNKS}
    samples = {c: {"graph_ms": [], "eager_ms": [], "graph_j": []} for c in CHUNKS}
    for _ in range(a.rounds):
        for c in CHUNKS:
            ms, joules = timed(graphs[c].replay, a.reps)
            samples[c]["graph_ms"].append(ms)
            samples[c]["graph_j"].append(joules)
            samples[c]["eager_ms"].append(
                timed(lambda c=c: mlp(x, weights, outs[c], c, silu_mul), max(1, a.reps // 4))[0])
        time.sleep(0.5)
    rows = []
    for c in CHUNKS:
        s = samples[c]
        row = {"chunk": c or a.tokens, "graph_ms": statistics.median(s["graph_ms"]),
               "eager_ms": statistics.median(s["eager_ms"]), "max_rel_error": errors[c],
               "joules": statistics.median(s["graph_j"]) if None not in s["graph_j"] else None}
        rows.append(row)
    whole = rows[0]["graph_ms"]
    flops = LAYERS * 2 * a.tokens * HIDDEN * 3 * INTER
    print(f"{LAYERS} MLPs at {a.tokens} tokens: {flops / 1e12:.2f} TFLOP")
    print("chunk   graph ms  TFLOP/s  vs whole  eager ms  J/pass  max rel err")
    for r in rows:
        j = f"{r['joules']:6.1f}" if r["joules"] is not None else "     -"
        print(f"{r['chunk']:5d}  {r['graph_ms']:9.2f}  {flops / r['graph_ms'] / 1e9:7.0f}  "
              f"{whole / r['graph_ms']:7.3f}x  {r['eager_ms']:8.2f}  {j}  {r['max_rel_error']:.1e}")
    save_result({"tokens": a.tokens, "layers": LAYERS, "rows": rows, "samples": {
        str(c or a.tokens): v for c, v in samples.items()}}, out_dir / "mlp_chunks.json",
        command("mlp_chunks", argv))


if __name__ == "__main__":
    main()
