"""Chapter 09's ladder: rungs (engines with settings, each named by its engine) run one after the
other on the same model, requests and device, beside the workload's physical floor. The padded
engines and the peers run at ``max_batch``; the paged ones (``RUNGS``) up to ``big_batch``
sequences in the KV memory the padded rows reserve. Options after a colon override a rung's
settings: ``fast:kv_memory_mib=16384``.
"""
from __future__ import annotations

import gc
import traceback

import torch

from course_lib.bench import bench, describe
from course_lib.measure.metrics import steps_of
from course_lib.measure.roofline import measure_peaks, workload_floor
from course_lib.model.kv_cache import kv_bytes_per_token
from course_lib.model.llama import LlamaShape
from course_lib.requests import load_workload

# engine -> its options on the ladder ("rows": the rows' KV memory; "big": big_batch;
# "max_num_batched_tokens": the ladder's budget). Every option is said, so that a rung stays what
# it measured whatever the engine's defaults.
_PAGED = {"block_size": 16, "attention": "flex", "kv_memory_bytes": "rows", "max_batch": "big",
          "max_num_batched_tokens": None, "cuda_graphs": False, "fused": False, "overlap": False,
          "watermark": 0.0}
RUNGS = {"paged": _PAGED,
         "chunked": {**_PAGED, "max_num_batched_tokens": "max_num_batched_tokens"},
         "fast": {**_PAGED, "max_num_batched_tokens": "max_num_batched_tokens",
                  "attention": "kernel", "cuda_graphs": True, "fused": True, "overlap": True}}

# Chapter 09's complete run on a GPU, most telling first: the peer on a clean card, the fast
# rungs, then the rest; hf-cb also with its KV-cache at half the free memory (room for its CUDA
# graphs' warm-up). SHORT_09: the notebook's live default, on fewer requests.
LADDER_09 = ["static", "hf-cb", "hf-cb:max_batch=512", "hf-cb:max_memory_percent=0.5",
             "hf-cb:max_batch=512,max_memory_percent=0.5",
             "fast:kv_memory_mib=16384,max_num_batched_tokens=16384",
             "fast:kv_memory_mib=16384,max_num_batched_tokens=8192",
             "fast:kv_memory_mib=16384,max_num_batched_tokens=8192,overlap=0",
             "fast:max_num_batched_tokens=8192", "fast", "fast:watermark=0.05", "paged", "chunked",
             "continuous", "hf-generate", "dynamic"]
SHORT_09 = [r for r in LADDER_09 if "max_memory_percent" not in r and r not in (
    "fast:kv_memory_mib=16384,max_num_batched_tokens=8192,overlap=0",
    "fast:max_num_batched_tokens=8192")]


def _split(spec: str):
    """``name[:key=value,...]`` -> (name, [(key, value), ...]), values as numbers where they are."""
    def number(text):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    name, _, over = spec.partition(":")
    return name, [(k, number(v)) for k, v in (item.split("=") for item in over.split(",") if item)]


def rung_settings(requests, shape, dtype_bytes: int, max_batch: int, big_batch: int = 512,
                  max_num_batched_tokens: int = 2048) -> dict:
    """What the rungs' named settings stand for on these requests: ``rows``, the KV memory the
    padded engines' ``max_batch`` rows reserve (each as long as the longest prompt plus the
    longest answer); ``big``, ``max_num_batched_tokens`` and ``max_batch`` as given."""
    longest = max(len(r.prompt_tokens) for r in requests) + max(r.max_new_tokens for r in requests)
    return {"rows": max_batch * longest * kv_bytes_per_token(shape, dtype_bytes),
            "big": big_batch, "max_num_batched_tokens": max_num_batched_tokens,
            "max_batch": max_batch}


def parse_rung(spec: str, settings: dict):
    """``name[:key=value,...]`` -> (rung name, engine, max_batch, engine options). The engine is
    the rung's name."""
    engine, overrides = _split(spec)
    options = {k: settings.get(v, v) if isinstance(v, str) else v
               for k, v in RUNGS.get(engine, {}).items()}
    for key, value in overrides:
        if key == "kv_memory_mib":
            key, value = "kv_memory_bytes", int(value * 2**20)
        options[key] = value
    max_batch = options.pop("max_batch", settings["max_batch"])
    return spec, engine, int(max_batch), options


ORDER = ["sequential", "static", "dynamic", "continuous", "paged", "chunked", "fast", "hf-generate",
         "hf-cb", "vllm"]


def label(rung: str) -> str:
    """A short name for a rung spec: ``fast:kv_memory_mib=16384,max_num_batched_tokens=8192``
    -> ``fast, 16 GiB KV, budget 8192``."""
    name, overrides = _split(rung)
    words = {"kv_memory_mib": lambda v: f"{v / 1024:g} GiB KV",
             "max_num_batched_tokens": lambda v: f"budget {v}",
             "watermark": lambda v: f"{v:.0%} kept free",
             "cuda_graphs": lambda v: "CUDA graphs" if v not in (0, "False") else "eager decode",
             "fused": lambda v: "fused" if v not in (0, "False") else "unfused elementwise",
             "overlap": lambda v: "host overlapped" if v not in (0, "False") else "host waited for",
             "prefix_caching": lambda v: ("" if v not in (0, "False") else "no ")
             + "prefix caching"}
    return ", ".join([name] + [words[k](v) if k in words else f"{k}={v}" for k, v in overrides])


def ordered(runs) -> list:
    """Runs in the ladder's order (rungs, then the peers), whatever order they ran in."""
    def key(r):
        name = r["rung"].partition(":")[0]
        tput = (r.get("metrics") or {}).get("output_tokens_per_s") or 0
        return (ORDER.index(name) if name in ORDER else len(ORDER), tput)   # slowest variant first
    return sorted(runs, key=key)


def free_device_memory(device) -> int | None:
    """Give back what the rungs before left on the card (their engines' caches and CUDA graph
    pools, once collected) and return the bytes tensors still hold: the model's weights, if
    nothing leaks. Hugging Face's engine sizes its KV-cache from the free memory."""
    if torch.device(device).type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device)


def run_ladder(loaded, model: str, workload: str, rungs, n: int, max_batch: int,
               big_batch: int = 512, max_num_batched_tokens: int = 2048, dtype: str = "bfloat16",
               device: str = "cuda", max_new_tokens: int | None = None, tokens: bool = False,
               sequential_n: int | None = None, progress: bool = True, echo=print,
               after_each=None) -> dict:
    """Run every rung; return one JSON object: settings, the floor and ``runs`` (the bench JSON of
    each rung, with its ``rung`` name; a rung that fails holds its ``error`` and the rest go on).
    ``after_each(result so far)`` is called after every rung (to save partial results)."""
    shape = LlamaShape.from_config(loaded.config)
    dtype_bytes = loaded.model.dtype.itemsize
    requests = load_workload(workload, tokenizer=loaded.tokenizer, n=n, vocab_size=shape.vocab_size,
                             max_new_tokens=max_new_tokens)
    settings = rung_settings(requests, shape, dtype_bytes, max_batch, big_batch,
                             max_num_batched_tokens)
    peaks = measure_peaks(device, loaded.model.dtype)
    floor = workload_floor(shape, dtype_bytes, [len(r.prompt_tokens) for r in requests],
                           [r.max_new_tokens for r in requests], peaks) \
        if all(r.ignore_eos for r in requests) else None      # with EOS the lengths are unknown
    if floor:
        echo(f"{'physical floor':>24} | {floor['seconds']:.2f} s, "
             f"{floor['output_tokens_per_s']:.0f} tok/s")
    result = {"model": model, "workload": workload, "n": n, "max_batch": max_batch,
              "big_batch": big_batch, "max_num_batched_tokens": max_num_batched_tokens,
              "kv_memory_rows_bytes": settings["rows"], "dtype": dtype, "floor": floor, "runs": []}
    runs = result["runs"]
    for spec in rungs:
        rung, engine, batch, options = parse_rung(spec, settings)
        count = sequential_n if engine == "sequential" and sequential_n else n
        held = free_device_memory(device)         # each rung starts on a card the last one left
        try:
            r = bench(engine, model, workload, count, batch, dtype, device, tokens=tokens,
                      max_new_tokens=max_new_tokens, loaded=loaded, steps=True,
                      engine_options=options or None, progress=progress)
        except Exception as e:       # one broken rung must not lose the others' measurements
            traceback.print_exc()
            runs.append({"rung": rung, "engine": engine, "error": f"{type(e).__name__}: {e}"})
            continue
        r["rung"] = rung
        if held is not None:
            r["memory_held_at_start_bytes"] = held
        failed = (r.get("metrics") or {}).get("warmup_failures")       # hf-cb: warm-ups HF skipped
        echo(f"{rung:>24} | " + describe(r)
             + ("" if held is None else f" | held at start {held / 2**30:.2f} GiB")
             + (f" | HF warm-ups failed: {failed}" if failed else ""))
        runs.append(r)
        result.update(device=r["device"], versions=r["versions"])
        if after_each:
            after_each(result)
    return result


def fastest_peer(result, peer: str = "hf-cb") -> tuple:
    """``(rung, tokens/s)`` of the fastest run of ``peer`` in a ladder result, whatever its
    settings (``hf-cb``, ``hf-cb:max_batch=512``, ...): the ratio to quote is to that one."""
    runs = [r for r in result["runs"] if "error" not in r and r["rung"].partition(":")[0] == peer]
    best = max(runs, key=lambda r: r["metrics"]["output_tokens_per_s"])
    return best["rung"], best["metrics"]["output_tokens_per_s"]


def table(result) -> list:
    """One row per rung: throughput, its ratio to the static rung, to each peer and to the floor,
    MBU, MFU, NVML utilisation, TTFT/TPOT p50 and the big decode steps' MBU."""
    runs = {r["rung"]: r for r in ordered(result["runs"]) if "error" not in r}
    tput = {k: r["metrics"]["output_tokens_per_s"] for k, r in runs.items()}
    floor = (result.get("floor") or {}).get("output_tokens_per_s")
    fastest_cb = fastest_peer(result)[1] if "hf-cb" in tput else None
    rows = []
    for name, r in runs.items():
        m, t = r["metrics"], tput[name]

        def x(base):
            return t / base if base else None
        rows.append({"rung": name, "label": label(name), "max_batch": r["max_batch"],
                     "tokens_per_s": t, "x_static": x(tput.get("static")),
                     "x_hf_cb": x(tput.get("hf-cb")), "x_fastest_hf_cb": x(fastest_cb),
                     "x_hf_generate": x(tput.get("hf-generate")), "of_floor": x(floor),
                     "mbu": m["mbu"], "mfu": m["mfu"], "nvml": m["nvml_gpu_util"],
                     "ttft_p50_s": m["ttft_s"]["p50"], "tpot_p50_s": m["tpot_s"]["p50"],
                     "decode_b128_mbu": (m.get("decode_b128") or {}).get("mbu"),
                     "preemptions": m.get("preemptions"),
                     "warmup_failures": m.get("warmup_failures")})
    return rows


def time_split(run) -> dict:
    """Where a run's makespan went, from its step log: seconds in prefill-only, mixed and
    decode-only steps, and between steps (the host deciding, the GPU idle); and its slowest
    steps (``(ms, prefill, decode)``)."""
    steps = steps_of(run)
    out = {"prefill": 0.0, "mixed": 0.0, "decode": 0.0,
           "between": sum(max(0.0, b.start_s - a.end_s) for a, b in zip(steps, steps[1:]))}
    for s in steps:
        out[s.kind] += s.seconds
    slow = sorted(steps, key=lambda s: -s.seconds)[:6]
    out["slowest"] = [(round(1e3 * s.seconds), s.prefill_tokens, s.decode_tokens) for s in slow]
    return out
