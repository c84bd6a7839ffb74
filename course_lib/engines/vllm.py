"""vLLM as a peer: its offline ``LLM.generate`` on the same requests, greedy, in a process of its
own (``python -m course_lib.engines.vllm SPEC OUT``: vLLM takes 90% of the card). It gets the
model as a Hugging Face folder and the prompts as token ids, all in one ``generate`` call after a
short warm-up on other ids (later arrivals are refused). From each request's first and last token
times (request stats on, as in ``vllm serve``) TTFT is exact and TPOT the mean."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from course_lib.engines.base import Engine

VLLM_VERSION = "0.26.0"
INSTALL = (f"engine 'vllm' needs vLLM {VLLM_VERSION.rsplit('.', 1)[0]} on a CUDA machine "
           f"(pip install vllm=={VLLM_VERSION})")


class EngineUnavailable(RuntimeError):
    """An engine that cannot run on this machine (a package or a device is missing)."""


def check_available():
    """Raise ``EngineUnavailable``, saying what to install, unless vLLM and CUDA are here."""
    import torch
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        raise EngineUnavailable(INSTALL)


class VllmEngine(Engine):
    name = "vllm"
    step_source = "vllm"
    own_process = True           # the bench loads nothing on the GPU for it, and runs no warm-up

    def __init__(self, loaded, max_batch: int = 256, max_num_batched_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, prefix_caching: bool = False,
                 enforce_eager: bool = False, in_process: bool = True, model_dir=None,
                 warmup: int = 8):
        check_available()
        super().__init__(loaded, max_batch)
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]: {gpu_memory_utilization}")
        self.options = {"max_num_seqs": max_batch, "max_num_batched_tokens": max_num_batched_tokens,
                        "gpu_memory_utilization": gpu_memory_utilization,
                        "prefix_caching": bool(prefix_caching), "enforce_eager": enforce_eager,
                        "in_process": in_process, "warmup": warmup}
        self.model_dir, self.settings = model_dir, {}

    def _folder(self) -> Path:
        """The model as a Hugging Face folder vLLM can load: ``model_dir``, or one written once."""
        if self.model_dir is not None:
            return Path(self.model_dir)
        from course_lib.model.models import cache_dir
        cfg = self.hf.config
        tag = f"{cfg.model_type}-{cfg.num_hidden_layers}x{cfg.hidden_size}-{self.hf.dtype}"
        folder = cache_dir() / "vllm" / tag.replace("torch.", "")
        if not (folder / "config.json").is_file():
            part = folder.with_name(folder.name + ".part")
            self.hf.save_pretrained(part)
            part.replace(folder)
        return folder

    def _serve(self, requests):
        if not requests:
            return
        late = [r.id for r in requests if r.arrival_s > 0]
        if late:
            raise ValueError(f"engine 'vllm' runs LLM.generate offline, every request at once; "
                             f"{len(late)} request(s) arrive later (e.g. {late[0]!r})")
        spec = {"model_dir": str(self._folder()), "options": self.options, "eos": self.eos,
                "max_context": self.max_context,
                "requests": [{"id": r.id, "prompt_tokens": list(r.prompt_tokens),
                              "max_new_tokens": r.max_new_tokens, "ignore_eos": r.ignore_eos}
                             for r in requests]}
        with tempfile.TemporaryDirectory() as tmp:
            spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
            spec_path.write_text(json.dumps(spec))
            env = {**os.environ, **child_env(self.options["in_process"])}
            started = self.now()
            proc = subprocess.run([sys.executable, "-m", "course_lib.engines.vllm",
                                   str(spec_path), str(out_path)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not out_path.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
                raise RuntimeError("vLLM's process failed:\n" + "\n".join(tail))
            out = json.loads(out_path.read_text())
        self.settings = out["settings"]
        self.settings["process_s"] = self.now() - started
        # the run's clock starts with the generate call (not the child's start-up and warm-up)
        self._t0 = self.clock() - out["wall_s"]
        for req in requests:
            got, rec = out["outputs"][req.id], self.records[req.id]
            rec.output_tokens = list(got["tokens"])
            first, last = got.get("first_token_s"), got.get("last_token_s")
            n = len(rec.output_tokens)
            if first is not None and last is not None and n:
                rec.token_times = [first + (last - first) * i / max(n - 1, 1) for i in range(n)]
            rec.finish("eos" if got["finish_reason"] == "stop" else "length",
                       last if last is not None else out["wall_s"])
            self._bar.update(1)


def child_env(in_process: bool) -> dict:
    """vLLM's environment: no FlashInfer sampler (greedy never needs it, and the GPU machines lack
    it), no network, and where its engine core runs."""
    return {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if in_process else "1"}


def _resolved(llm, options: dict) -> dict:
    """What vLLM made of its settings (what cannot be read is recorded as an error)."""
    import vllm
    out = {"vllm_version": vllm.__version__, "in_process": options["in_process"],
           "gpu_memory_utilization": options["gpu_memory_utilization"]}
    try:
        vc = llm.llm_engine.vllm_config
        cache, sched, comp = vc.cache_config, vc.scheduler_config, vc.compilation_config
        out.update(max_num_seqs=sched.max_num_seqs,
                   max_num_batched_tokens=sched.max_num_batched_tokens,
                   block_size=cache.block_size, num_gpu_blocks=cache.num_gpu_blocks,
                   prefix_caching=bool(cache.enable_prefix_caching),
                   async_scheduling=getattr(sched, "async_scheduling", None),
                   compilation_mode=str(getattr(comp, "mode", getattr(comp, "level", ""))),
                   cudagraph_mode=str(getattr(comp, "cudagraph_mode", "")),
                   enforce_eager=vc.model_config.enforce_eager)
        m = vc.model_config
        per_token = (2 * m.get_num_layers(vc.parallel_config) * m.get_num_kv_heads(
            vc.parallel_config) * m.get_head_size() * m.dtype.itemsize)
        out["kv_memory_bytes"] = cache.num_gpu_blocks * cache.block_size * per_token
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def child(spec_path, out_path):
    """The vLLM process: one warm-up, then every request through one ``LLM.generate`` call."""
    spec = json.loads(Path(spec_path).read_text())
    opts, reqs = spec["options"], spec["requests"]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    longest = max(len(r["prompt_tokens"]) + r["max_new_tokens"] for r in reqs)
    kw = dict(model=spec["model_dir"], skip_tokenizer_init=True, seed=0, disable_log_stats=False,
              gpu_memory_utilization=opts["gpu_memory_utilization"],
              enable_prefix_caching=opts["prefix_caching"], enforce_eager=opts["enforce_eager"],
              max_model_len=min(spec["max_context"], max(longest, 256)),
              max_num_seqs=opts["max_num_seqs"])
    llm = LLM(**kw, **{k: opts[k] for k in ["max_num_batched_tokens"] if opts[k]})

    def params(r, n=None):
        return SamplingParams(max_tokens=n or r["max_new_tokens"], temperature=0.0,
                              ignore_eos=r["ignore_eos"], detokenize=False,
                              stop_token_ids=None if r["ignore_eos"] else [spec["eos"]])
    rng = random.Random(1)            # warm-up: the same shapes, other token ids
    warm = reqs[:opts["warmup"]]
    if warm:
        llm.generate([TokensPrompt(prompt_token_ids=[rng.randrange(3, 1000) for _ in
                                                     r["prompt_tokens"]]) for r in warm],
                     [params(r, min(16, r["max_new_tokens"])) for r in warm], use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_tokens"]) for r in reqs]
    start_wall, start = time.time(), time.perf_counter()
    outs = llm.generate(prompts, [params(r) for r in reqs], use_tqdm=False)
    wall = time.perf_counter() - start
    outputs = {r["id"]: {"tokens": list(o.outputs[0].token_ids),
                         "finish_reason": o.outputs[0].finish_reason,
                         **_token_span(getattr(o, "metrics", None), start_wall, start)}
               for r, o in zip(reqs, outs)}
    Path(out_path).write_text(json.dumps({"wall_s": wall, "outputs": outputs,
                                          "settings": _resolved(llm, opts)}))


def _token_span(metrics, start_wall: float, start_mono: float) -> dict:
    """The first and last token's times from the start of the call, where vLLM's stats have them."""
    first = getattr(metrics, "first_token_ts", None) or getattr(metrics, "first_token_time", None)
    last = getattr(metrics, "last_token_ts", None) or getattr(metrics, "last_token_time", None)
    if not first or not last:
        return {}
    base = start_wall if first > 1e9 else start_mono          # epoch seconds or monotonic
    return {"first_token_s": first - base, "last_token_s": last - base}


if __name__ == "__main__":
    child(*sys.argv[1:3])
