"""Measuring how well a step uses the machine: the device's peaks, measured (never copied from a
datasheet); the bytes a forward pass *must* move and the FLOPs it *must* do (``step_work``);
NVML's "GPU utilisation", sampled during a run.

MBU (model bandwidth utilisation) = bytes a step must move / step time / peak bandwidth.
MFU (model FLOPs utilisation)     = FLOPs a step must do  / step time / peak FLOP/s.
"""
from __future__ import annotations

import json
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch

from course_lib.model.kv_cache import kv_bytes_per_token
from course_lib.model.llama import matmul_params_per_token
from course_lib.model.models import cache_dir


# ---------------------------------------------------------------- peaks, measured on this device
@dataclass
class Peaks:
    device: str
    dtype: str
    bandwidth: float      # bytes/s, a large device-to-device copy (bytes read + bytes written)
    flops: float          # FLOP/s, a large matrix product in ``dtype`` on random data
    method: str

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) above which a kernel is compute-bound."""
        return self.flops / self.bandwidth


def cpu_model() -> str | None:
    """The host CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def host_python_ms(repeat: int = 3) -> float:
    """Milliseconds this host takes for a fixed piece of pure Python (the fastest of ``repeat``):
    hosts of one model name differ, and an engine that schedules in Python runs at its host's
    speed."""
    def once():
        start, d = time.perf_counter(), {}
        for i in range(50_000):
            d[i % 997] = d.get(i % 997, 0) + i
        return time.perf_counter() - start
    return round(min(once() for _ in range(repeat)) * 1e3, 3)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model() or platform.machine()} ({torch.get_num_threads()} threads)"


def time_fn(fn, device, repeat: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` after warm-up; CUDA is timed with events."""
    for _ in range(warmup):
        fn()
    cuda, times = torch.device(device).type == "cuda", []
    for _ in range(repeat):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _measure(device, dtype) -> Peaks:
    cuda = torch.device(device).type == "cuda"
    n_bytes, n, repeat = ((2 << 30), 8192, 20) if cuda else ((256 << 20), 1024, 5)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device, repeat=repeat)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    t_mm = time_fn(lambda: a @ b, device, repeat=repeat)
    return Peaks(device_name(device), str(dtype).removeprefix("torch."), 2 * n_bytes / t_copy,
                 2 * n ** 3 / t_mm,
                 f"copy of {n_bytes >> 20} MiB (read + write); {n}x{n}x{n} matmul on random data; "
                 f"median of repeats after warm-up")


def measure_peaks(device="cpu", dtype=torch.float32, refresh: bool = False) -> Peaks:
    """Measured peaks of ``device`` for ``dtype``, cached in ``cache_dir()/peaks.json``."""
    dtype_name = str(dtype).removeprefix("torch.")
    key = f"{device_name(device)} | {dtype_name} | torch {torch.__version__}"
    path = cache_dir() / "peaks.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    if key not in table or refresh:
        table[key] = asdict(_measure(device, dtype))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=2))
    return Peaks(**table[key])


# ---------------------------------------------------------------- bytes and FLOPs of a step
def weight_bytes(shape, dtype_bytes: int) -> int:
    """Weights a forward pass reads once: every layer's matrices and norms, the final norm and the
    output head. The embedding table is not read whole (only the rows of the tokens)."""
    norms = (2 * shape.n_layers + 1) * shape.hidden
    return (matmul_params_per_token(shape) + norms + shape.vocab_size * shape.hidden) * dtype_bytes


def attended_pairs(cached: int, new: int) -> int:
    """(query, key) pairs of ``new`` tokens after ``cached`` ones, causal: each new token sees the
    cached ones, the new ones before it, and itself."""
    return new * cached + new * (new + 1) // 2


@dataclass
class Work:
    bytes: float
    flops: float


def step_work(shape, dtype_bytes: int, tokens: int, attended: int, kv_read: int,
              logit_rows: int) -> Work:
    """What a forward pass must do: ``tokens`` whose hidden states are needed (no padding), the
    (query, key) pairs they ``attended`` (``attended_pairs``), the cached tokens whose K and V it
    must read (``kv_read``), the tokens whose logits it computes (``logit_rows``)."""
    s = shape
    flops = (2 * matmul_params_per_token(s) * tokens
             + 4 * s.n_layers * s.n_heads * s.head_dim * attended
             + 2 * s.vocab_size * s.hidden * logit_rows)
    kv = kv_bytes_per_token(s, dtype_bytes)
    moved = weight_bytes(s, dtype_bytes) + kv * (kv_read + tokens)   # read the cache, write K, V
    return Work(moved, flops)


def pair_counts(pairs) -> tuple:
    """``(tokens, attended, kv_read)`` of a step in which each sequence feeds ``new`` tokens after
    ``cached`` ones (``pairs``: one ``(cached, new)`` per sequence)."""
    pairs = list(pairs)
    return (sum(n for _, n in pairs), sum(attended_pairs(c, n) for c, n in pairs),
            sum(c for c, _ in pairs))


def pairs_work(shape, dtype_bytes: int, pairs) -> Work:
    """``step_work`` of such a step (``pair_counts``), each sequence getting one row of logits."""
    return step_work(shape, dtype_bytes, *pair_counts(pairs), len(pairs))


def prefill_work(shape, dtype_bytes: int, lengths, padded: bool) -> Work:
    """The work of prefilling prompts of ``lengths`` in one step: padded to the longest (every
    row computes ``max(lengths)`` positions and attends over all of them, the padding masked but
    computed) or packed (each prompt's own tokens, attention within each prompt only)."""
    if not padded:
        return pairs_work(shape, dtype_bytes, [(0, n) for n in lengths])
    B, T = len(lengths), max(lengths)
    return step_work(shape, dtype_bytes, tokens=B * T, attended=B * T * T, kv_read=0,
                     logit_rows=B)


def workload_floor(shape, dtype_bytes: int, prompt_lens, output_lens, peaks) -> dict:
    """The physical floor of a workload: its time at the measured peaks (a bound only as good as
    they are). Prefill: every prompt's FLOPs at the matmul rate. Decode: every sequence side by
    side, one step per output token after the first, each reading the weights and the running
    sequences' K and V at the copy bandwidth (or doing its FLOPs, if slower)."""
    prompt_lens, output_lens = list(prompt_lens), list(output_lens)
    prefill_flops = prefill_work(shape, dtype_bytes, prompt_lens, padded=False).flops
    prefill_s, decode_s, decode_bytes = prefill_flops / peaks.flops, 0.0, 0.0
    for t in range(1, max(output_lens, default=1)):       # step t feeds each sequence's t-th token
        w = pairs_work(shape, dtype_bytes, [(p + t - 1, 1) for p, n in
                                            zip(prompt_lens, output_lens) if n > t])
        decode_s += max(w.bytes / peaks.bandwidth, w.flops / peaks.flops)
        decode_bytes += w.bytes
    total, out = prefill_s + decode_s, sum(output_lens)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "seconds": total,
            "prefill_flops": prefill_flops, "decode_bytes": decode_bytes, "output_tokens": out,
            "output_tokens_per_s": out / total if total > 0 else None}


# ---------------------------------------------------------------- NVML
class NvmlSampler:
    """Samples NVML's GPU utilisation (percent of time a kernel was running) in a thread:
    ``with NvmlSampler() as s: ...``, then ``s.samples`` (without NVML: ``s.mean`` is None)."""

    def __init__(self, index: int = 0, interval_s: float = 0.05):
        self.index, self.interval_s, self.samples = index, interval_s, []
        self._stop, self._thread = threading.Event(), None

    def __enter__(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __exit__(self, *exc):
        if self._thread:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self):
        return statistics.fmean(self.samples) if self.samples else None


# ---------------------------------------------------------------- one step, timed, vs batch size
def time_step(model, batch: int, context: int, new_tokens: int = 1, repeat: int = 5,
              warmup: int = 2, graph: bool = False) -> float:
    """Median seconds of one forward pass of ``batch`` sequences, each with ``context`` tokens
    already cached and ``new_tokens`` new ones. ``graph=False``: what a Python engine pays, masks
    built and kernels launched from Python; ``graph=True`` (CUDA): the replays of a CUDA graph of
    the step, what the GPU itself needs."""
    from course_lib.model.attention import PaddedAttention
    from course_lib.model.kv_cache import ContiguousKVCache
    dev = model.device
    cache = ContiguousKVCache(model.shape, batch, context + new_tokens, model.dtype, dev)
    cache.k.normal_(), cache.v.normal_()          # random, never zeros: zeros can run faster
    tokens = torch.randint(3, model.shape.vocab_size, (batch, new_tokens), device=dev)
    write_at = torch.arange(context, context + new_tokens, device=dev).expand(batch, new_tokens)
    start = torch.zeros(batch, dtype=torch.long, device=dev)

    def forward(attn):
        hidden = model.hidden_states(tokens, attn.positions, attn)
        return model.logits(hidden[:, -1]).argmax(-1)       # the next token of every sequence

    def attention():
        return PaddedAttention(cache, range(batch), start, write_at, context + new_tokens)

    if not graph:
        return time_fn(lambda: forward(attention()), dev, repeat=repeat, warmup=warmup)
    if torch.device(dev).type != "cuda":
        raise ValueError("graph=True needs a CUDA device")
    attn = attention()
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):                     # warm up off the default stream
        for _ in range(2):
            forward(attn)
    torch.cuda.current_stream(dev).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        forward(attn)
    return time_fn(g.replay, dev, repeat=repeat, warmup=warmup)


def step_row(model, peaks, batch: int, context: int, new_tokens: int, seconds: float,
             mode: str = "eager") -> dict:
    """Bytes, FLOPs, MBU and MFU of one timed step."""
    n = new_tokens
    w = pairs_work(model.shape, model.dtype.itemsize, [(context, n)] * batch)
    return {"kind": "decode" if n == 1 else "prefill", "mode": mode, "batch": batch,
            "context": context, "new_tokens": n, "step_s": seconds,
            "tokens_per_s": batch * n / seconds, "bytes": w.bytes, "flops": w.flops,
            "intensity": w.flops / w.bytes,
            "mbu": w.bytes / seconds / peaks.bandwidth, "mfu": w.flops / seconds / peaks.flops}


def batch_sweep(model, peaks, batch_sizes=(1, 2, 4, 8, 16, 32, 64), context: int = 128,
                prefill_tokens: int = 256, repeat: int = 5, progress: bool = False,
                graph: bool = False) -> list:
    """Decode-step time at each batch size (plus one prefill step, for contrast).
    ``graph=True`` times CUDA-graph replays (see ``time_step``)."""
    from tqdm.auto import tqdm

    def row(batch: int, context: int, new_tokens: int) -> dict:
        t = time_step(model, batch, context, new_tokens, repeat, graph=graph)
        return step_row(model, peaks, batch, context, new_tokens, t, "graph" if graph else "eager")
    rows = [row(b, context, 1)
            for b in tqdm(batch_sizes, desc="batch sizes", disable=not progress, leave=False)]
    return rows + ([row(1, 0, prefill_tokens)] if prefill_tokens else [])


# ---------------------------------------------------------------- the seed's back-of-envelope
def memory_bound_utilisation(n_params: float, bytes_per_param: float, batch: int,
                             bandwidth: float, flops: float) -> dict:
    """The seed chapter's "load 14 GB -> 1 token: ~1%" argument: a memory-bound decode step takes
    the weights over the bandwidth, in which the chip could do ``flops x time`` operations; the
    step needs ``2 x n_params x batch``."""
    step_s = n_params * bytes_per_param / bandwidth
    needed = 2 * n_params * batch
    return {"step_s": step_s, "tokens_per_s": batch / step_s,
            "compute_utilisation": needed / step_s / flops,
            "intensity": needed / (n_params * bytes_per_param)}
