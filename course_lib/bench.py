"""The benchmark command line: one engine, one model, one workload, one JSON file.

    python -m course_lib.bench --engine continuous --model smollm2-135m --workload chat \\
        --n 32 --max-batch 16 --json out.json
    python -m course_lib.bench --engine fast --model llama-1b-dummy --dtype bfloat16 \\
        --workload anyscale --max-batch 512 --kv-memory-mib 16384 --json fast.json

The JSON holds ``engine`` (the registry's name of what ran), ``engine_options`` (given, and as
the engine resolved them), ``model``, ``device`` (name and measured peaks), ``versions``,
``metrics`` (throughput, latency percentiles, slot utilisation, MBU, MFU, NVML utilisation) and
``requests`` (one row per request).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from course_lib.engines import REGISTRY, EngineOptionError, engine_settings, make_engine, resolve
from course_lib.engines.policies import SLO
from course_lib.engines.vllm import EngineUnavailable, check_available
from course_lib.measure import simulator
from course_lib.measure.metrics import request_rows, step_rows, summarize
from course_lib.measure.roofline import NvmlSampler, Peaks, cpu_model, host_python_ms, measure_peaks
from course_lib.model import models
from course_lib.model.llama import LlamaShape
from course_lib.requests import RequestError, WorkloadError, load_workload, poisson_arrivals


def versions() -> dict:
    """The software and the machine a result was measured on: the host, its CPU and the card."""
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "course_lib_commit": commit(), "host": platform.node(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "host_python_ms": host_python_ms(),
            "gpu": gpu_identity()}


def gpu_identity() -> dict | None:
    """The physical card (NVML): its UUID, power limit and top clocks; None without one."""
    if not torch.cuda.is_available():
        return None
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        uuid = pynvml.nvmlDeviceGetUUID(h)
        clock = pynvml.nvmlDeviceGetMaxClockInfo
        return {"uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1e3,
                "sm_clock_max_mhz": clock(h, pynvml.NVML_CLOCK_SM),
                "memory_clock_max_mhz": clock(h, pynvml.NVML_CLOCK_MEM)}
    except Exception as e:            # no NVML (or no permission): say so rather than guess
        return {"error": f"{type(e).__name__}: {e}"}


def commit() -> str | None:
    """The repository's commit, ``+dirty`` if the code that measures (not ``bench/results``) has
    changes; ``$COURSE_COMMIT`` where the checkout has no .git (e.g. a GPU box)."""
    if os.environ.get("COURSE_COMMIT"):
        return os.environ["COURSE_COMMIT"]
    git = ["git", "-C", str(Path(__file__).resolve().parent.parent)]
    try:
        out = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "--",
                                      "course_lib", "bench", ":(exclude)bench/results"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None


def save_result(result: dict, path, command: str) -> Path:
    """Write a result as the course stores them: with the versions, commit and exact command."""
    result = {**result, "versions": result.get("versions") or versions(), "command": command}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")     # whole or not at all, for a reader meanwhile
    part.write_text(json.dumps(result, indent=1))
    part.replace(path)
    return path


def bench(engine: str, model: str = "smollm2-135m", workload: str = "chat", n: int | None = None,
          max_batch: int = 8, dtype: str = "float32", device: str = "cpu", tokens: bool = False,
          max_new_tokens: int | None = None, seed: int = 0, progress: bool = True,
          loaded=None, steps: bool = False, engine_options: dict | None = None,
          warmup: bool = True, arrival_rate: float | None = None, simulate=None, slo=None,
          admission: bool = False) -> dict:
    """Run one benchmark and return the JSON object (also what the CLI writes).

    ``arrival_rate``: Poisson arrivals, that many per second (None: all at once). ``simulate``: a
    fitted ``StepCost`` or ``CostBook`` (or a stored ``CostBook``'s path): the scheduler runs as
    usual but nothing is computed, each step taking the time the cost model predicts (the JSON
    says ``"simulated": true``). ``slo``: an ``SLO`` for goodput; ``admission``: the engine
    admits, queues or refuses requests to meet it.
    """
    if admission:
        if slo is None:
            raise EngineOptionError("admission control needs an SLO (a TTFT or a TPOT target)")
        engine_options = {**(engine_options or {}), "slo": slo}
    if arrival_rate is not None and not arrival_rate > 0:
        raise WorkloadError(f"arrival rate must be > 0 requests/s, got {arrival_rate}")
    models.preset(model)                       # an unknown model is refused before any loading
    engine_options = {k: v for k, v in (engine_options or {}).items() if v is not None}
    _, spec, _ = resolve(engine, {"max_batch": max_batch, **engine_options})
    own_process = getattr(spec.cls, "own_process", False)      # vllm: nothing of ours on the GPU
    if own_process:
        check_available()
        if simulate is not None:
            raise EngineOptionError(f"engine {engine!r} cannot be simulated")
    if simulate is None:
        loaded = loaded or models.load(model, dtype=dtype,
                                       device="cpu" if own_process else device)
        dtype_t, tokenizer = loaded.model.dtype, loaded.tokenizer
        shape = LlamaShape.from_config(loaded.config)
    else:                       # nothing runs: the preset's shape is all the cost model needs
        dtype_t, shape = models._dtype(dtype), models.preset_shape(model)
        tokenizer = models.load_tokenizer()    # as a measured run: text prompts are encoded
    requests = load_workload(workload, tokenizer=tokenizer, n=n, vocab_size=shape.vocab_size,
                             seed=seed, max_new_tokens=max_new_tokens)
    if arrival_rate is not None:
        requests = poisson_arrivals(requests, arrival_rate, seed)
    options = {k: asdict(v) if k == "slo" else v for k, v in engine_options.items()
               if k != "step_cost"}           # as the JSON stores them: an SLO as its targets
    if simulate is None:
        peaks = measure_peaks(device, dtype_t)
        runner = make_engine(engine, loaded, max_batch=max_batch, **engine_options)
        if own_process and torch.cuda.is_available():
            torch.cuda.empty_cache()          # the card to the engine's process, bar our context
        if warmup and not own_process:   # kernel loading, allocator growth...: not timed
            runner.prepare(requests)
            runner.run([replace(r, id=f"warmup-{r.id}", arrival_s=0.0,
                                max_new_tokens=min(4, r.max_new_tokens)) for r in requests[:2]])
        with NvmlSampler(torch.device(device).index or 0) as nvml:
            log = runner.run(requests, progress=progress)
        device_type, nvml_mean, step_source = torch.device(device).type, nvml.mean, log.step_source
        options.update(engine_settings(runner))      # the settings as the engine resolved them
    else:
        cost = simulator.CostBook.load(simulate) if isinstance(simulate, (str, Path)) else simulate
        if isinstance(cost, simulator.CostBook):
            cost = cost.for_run(engine, engine_options)
        runner, log = simulator.simulate(engine, requests, cost, shape, dtype_t.itemsize,
                                         max_batch, **engine_options)
        peaks = Peaks(cost.device, dtype, cost.bandwidth, cost.flops, "simulated")
        device_type, nvml_mean, step_source = "simulated", None, "simulated"
    metrics = summarize(log, shape, dtype_t.itemsize, peaks, slo=slo)
    # hf-cb's warm-ups HF gave up on (memory); the prompt tokens a prefix cache saved
    metrics.update(nvml_gpu_util=nvml_mean, **{k: getattr(runner, k) for k in (
        "preemptions", "warmup_failures", "prefix_hit_tokens") if hasattr(runner, k)})
    out = {"engine": runner.name, "model": model, "workload": workload, "n": len(requests),
           "max_batch": max_batch, "max_new_tokens": max_new_tokens,
           "arrival_rate": arrival_rate, "engine_options": options,
           "dtype": str(dtype_t).removeprefix("torch."),
           "device": {"type": device_type, **asdict(peaks)}, "versions": versions(),
           "step_source": step_source, "metrics": metrics,
           "requests": request_rows(log, with_tokens=tokens)}
    if simulate is not None:   # output lengths are each request's max_new_tokens: no EOS there
        out.update(simulated=True, cost_model=asdict(cost))
    if steps:
        out["steps"] = step_rows(log)
    return out


def describe(result: dict) -> str:
    m = result["metrics"]

    def ms(x):
        return "-" if x is None else f"{x * 1e3:.1f} ms"

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"
    device = result["device"]["device"] + (" (simulated)" if result.get("simulated") else "")
    return (f"{result['engine']:>12} | {result['model']} | {device} | "
            f"B={result['max_batch']} | {m['output_tokens_per_s'] or 0:.1f} tok/s | "
            f"TTFT p50 {ms(m['ttft_s']['p50'])} | TPOT p50 {ms(m['tpot_s']['p50'])} | "
            f"slots {pct(m['slot_utilisation'])} | MBU {pct(m['mbu'])} | MFU {pct(m['mfu'])}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m course_lib.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, metavar="ENGINE",
                   help="one of: " + ", ".join(REGISTRY))
    p.add_argument("--model", default="smollm2-135m", metavar="MODEL",
                   help="one of: " + ", ".join(models.PRESETS) + " (default smollm2-135m)")
    p.add_argument("--workload", default="chat",
                   help="chat, anyscale, lognormal, prefix (each with settings, e.g. "
                        "anyscale:prompt_len=64,cap=128,mean=64), or a .jsonl file")
    p.add_argument("--n", type=int, default=None, help="number of requests")
    p.add_argument("--max-batch", type=int, default=8,
                   help="most sequences at once (vllm: max_num_seqs)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="for the chat workload (default 128); an upper limit for the others")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g = p.add_argument_group("chunked, paged and fast engines (default: the engine's own)")
    for flag, kind, text in (
        ("--max-num-batched-tokens", int, "token budget per step (chunked prefill); also vllm's"),
        ("--block-size", int, "tokens per KV-cache block (default 16)"),
        ("--num-blocks", int, "a KV-cache of this many blocks (preempts when full)"),
        ("--kv-memory-mib", float, "a KV-cache of as many blocks as fit in this many MiB"),
    ):
        g.add_argument(flag, type=kind, default=None, help=text)
    g.add_argument("--attention", default=None, choices=["gather", "flex", "kernel"],
                   help="gather K/V (the reference), FlexAttention reading the blocks in place, or "
                        "the Triton decode kernel (fast)")
    for flag, text in (
        ("--cuda-graphs", "replay decode steps as CUDA graphs (needs CUDA and attention kernel)"),
        ("--fused", "fused Triton elementwise kernels (needs CUDA)"),
        ("--overlap", "schedule step k+1 while step k runs on the GPU"),
        ("--prefix-caching", "share the KV blocks of identical prompt prefixes (also vllm's)"),
    ):
        g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    g.add_argument("--watermark", type=float, default=None, metavar="F",
                   help="fraction of the KV blocks kept free when admitting")
    g.add_argument("--admission", action="store_true",
                   help="admit, queue or refuse requests to meet the SLO (paged engine)")
    p.add_argument("--arrival-rate", type=float, default=None,
                   help="requests arrive as a Poisson process of this many per second "
                        "(default: all at once)")
    p.add_argument("--simulate", default=None, metavar="COST_JSON",
                   help="simulate the run with a fitted step-cost model "
                        "(python -m bench simulator_validation --out COST_JSON)")
    p.add_argument("--ttft-slo", type=float, default=None, help="TTFT target in seconds (goodput)")
    p.add_argument("--tpot-slo", type=float, default=None, help="TPOT target in seconds (goodput)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", action="store_true", help="store each request's output tokens")
    p.add_argument("--steps", action="store_true", help="store the step log")
    p.add_argument("--json", required=True, help="where to write the result")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()     # stderr holds the run's own progress, and errors alone
    slo = None if a.ttft_slo is None and a.tpot_slo is None else SLO(a.ttft_slo, a.tpot_slo)
    a.kv_memory_bytes = None if a.kv_memory_mib is None else int(a.kv_memory_mib * 2**20)
    options = {k: getattr(a, k) for k in (       # None: the engine's own
        "max_num_batched_tokens", "block_size", "num_blocks", "attention", "kv_memory_bytes",
        "cuda_graphs", "fused", "overlap", "watermark", "prefix_caching")}
    try:
        result = bench(a.engine, a.model, a.workload, a.n, a.max_batch, a.dtype, a.device,
                       a.tokens, a.max_new_tokens, a.seed, progress=True, steps=a.steps,
                       engine_options=options, arrival_rate=a.arrival_rate,
                       simulate=a.simulate, admission=a.admission, slo=slo)
    except (WorkloadError, RequestError, EngineOptionError, EngineUnavailable,
            models.ModelError) as e:  # a user's mistake: first line only, exit status 2
        print(f"error: {(str(e).strip() or type(e).__name__).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    save_result(result, a.json, "python -m course_lib.bench " + " ".join(
        shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv)))
    print(describe(result))


if __name__ == "__main__":
    main()
