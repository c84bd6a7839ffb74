"""Requests and workloads: what the batching schedulers of the course are fed.

A *request* is one prompt (token ids), how many tokens to generate and when it arrives; a
*workload* is a list of them: real chat messages (``data/chat.jsonl``), synthetic ones (random
prompts, chosen lengths) or a ``.jsonl`` file of your own. :func:`load_workload` builds one from a
short spec, and :func:`poisson_arrivals` spreads it out in time like real traffic.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from itertools import cycle
from pathlib import Path

import numpy as np

CHAT_FILE = Path(__file__).parent / "data" / "chat.jsonl"


@dataclass
class Request:
    """One generation request: with ``ignore_eos`` exactly ``max_new_tokens`` are generated, even
    past the model's end-of-sequence token."""

    id: str
    prompt_tokens: list[int]  # fed to the model: for chat, the template around the user message
    max_new_tokens: int
    arrival_s: float = 0.0  # when it reaches the server, in seconds from the start of the run
    ignore_eos: bool = False
    prompt: str | None = None  # the user message, when the request was given as text


class WorkloadError(ValueError):
    """A workload file or workload spec is malformed."""


class RequestError(ValueError):
    """A request cannot be served (e.g. it does not fit the model's context)."""


def validate(req: Request, max_context: int, vocab_size: int | None = None) -> None:
    """Raise :class:`RequestError`, naming ``req`` and the problem, unless a model with
    ``max_context`` positions (and, given, ``vocab_size`` token ids) can serve it."""
    where = f"request {req.id!r}"
    if len(req.prompt_tokens) == 0:
        raise RequestError(f"{where}: empty prompt (no prompt tokens)")
    if vocab_size is not None and (bad := check_token_ids(req.prompt_tokens, vocab_size)):
        raise RequestError(f"{where}: {bad}")
    if req.max_new_tokens < 1:
        raise RequestError(f"{where}: max_new_tokens must be >= 1, got {req.max_new_tokens}")
    total = len(req.prompt_tokens) + req.max_new_tokens
    if total > max_context:
        raise RequestError(f"{where}: prompt ({len(req.prompt_tokens)} tokens) + max_new_tokens "
                           f"({req.max_new_tokens}) = {total} tokens, longer than max_context "
                           f"{max_context}")
    if req.arrival_s < 0:
        raise RequestError(f"{where}: arrival_s must be >= 0, got {req.arrival_s}")


def check_token_ids(tokens, vocab_size: int) -> str | None:
    """What is wrong with ``tokens`` as ids of a vocabulary of ``vocab_size`` (None: nothing):
    an id the model has no embedding for would fail deep inside the forward pass."""
    for i, t in enumerate(tokens):
        if not 0 <= t < vocab_size:
            return (f"prompt token id {t} (position {i}) is outside the model's vocabulary "
                    f"of {vocab_size} ids (0 to {vocab_size - 1})")


def encode_chat(tokenizer, message: str, system: str | None = None) -> list[int]:
    """Token ids of ``message`` as a single user turn, ready for the assistant's answer, after
    ``system`` as the system prompt (None: the template's own)."""
    turns = [{"role": "system", "content": system}] * (system is not None)
    # rendered to text, then tokenized: with tokenize=True transformers 5 returns a dict
    text = tokenizer.apply_chat_template(turns + [{"role": "user", "content": message}],
                                         add_generation_prompt=True, tokenize=False)
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


# ----------------------------------------------------------------- jsonl files

_KEYS = {"id", "prompt", "prompt_tokens", "max_new_tokens", "arrival_s", "ignore_eos"}


def _prompt_tokens(obj, tokenizer, vocab_size) -> list:
    """A line's prompt as token ids: its ``prompt`` text encoded, or its ``prompt_tokens``."""
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a string, got {prompt!r}")
        if not prompt.strip():
            raise ValueError("'prompt' is empty")
        if tokenizer is None:
            raise ValueError("'prompt' is text, so a tokenizer is needed to encode it")
        return encode_chat(tokenizer, prompt)
    tokens = obj["prompt_tokens"]
    if not (isinstance(tokens, list) and tokens
            and all(type(t) is int and t >= 0 for t in tokens)):
        raise ValueError("'prompt_tokens' must be a non-empty list of non-negative integers")
    if vocab_size is not None and (bad := check_token_ids(tokens, vocab_size)):
        raise ValueError(bad)
    return list(tokens)


def _parse_line(obj, tokenizer, vocab_size: int | None = None) -> Request:
    """Turn one decoded JSON line into a Request; raises ValueError with the problem. (JSON
    values have exact types: ``type(x) is int`` is an integer, never a boolean.)"""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if unknown := sorted(set(obj) - _KEYS):
        raise ValueError(f"unknown key(s) {unknown}; allowed keys are {sorted(_KEYS)}")
    for key in ("id", "max_new_tokens"):
        if key not in obj:
            raise ValueError(f"missing key {key!r}")
    rid, max_new = obj["id"], obj["max_new_tokens"]
    if not (isinstance(rid, str) or type(rid) is int):
        raise ValueError(f"'id' must be a string or an integer, got {rid!r}")
    if type(max_new) is not int or max_new < 1:
        raise ValueError(f"'max_new_tokens' must be an integer >= 1, got {max_new!r}")
    if "prompt" in obj and "prompt_tokens" in obj:
        raise ValueError("give either 'prompt' or 'prompt_tokens', not both")
    if not ("prompt" in obj or "prompt_tokens" in obj):
        raise ValueError("missing key: one of 'prompt' or 'prompt_tokens' is required")
    tokens = _prompt_tokens(obj, tokenizer, vocab_size)
    arrival, ignore_eos = obj.get("arrival_s", 0.0), obj.get("ignore_eos", False)
    if type(arrival) not in (int, float) or not math.isfinite(arrival) or arrival < 0:
        raise ValueError(f"'arrival_s' must be a number >= 0, got {arrival!r}")
    if not isinstance(ignore_eos, bool):
        raise ValueError(f"'ignore_eos' must be true or false, got {ignore_eos!r}")
    return Request(str(rid), tokens, max_new, float(arrival), ignore_eos, obj.get("prompt"))


def load_jsonl(path, tokenizer=None, vocab_size: int | None = None) -> list[Request]:
    """Read requests from a JSON-lines file: one object a line (blank lines skipped), with

    * ``id`` (string or integer, required, unique),
    * exactly one of ``prompt`` (a user message; the chat template is applied, so a
      ``tokenizer`` is needed) or ``prompt_tokens`` (token ids, each below ``vocab_size`` if given),
    * ``max_new_tokens`` (integer >= 1, required),
    * ``arrival_s`` (number >= 0, default 0, never earlier than the line before),
    * ``ignore_eos`` (true/false, default false).

    Any problem raises :class:`WorkloadError` with a message starting ``"<path>:<line>: "``.
    """
    requests: list[Request] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}: "
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                req = _parse_line(json.loads(line), tokenizer, vocab_size)
            except UnicodeDecodeError:
                raise WorkloadError(where + "not UTF-8 text: a .jsonl file holds one JSON "
                                    "object per line") from None
            except json.JSONDecodeError as e:
                raise WorkloadError(where + f"invalid JSON: {e.msg} (column {e.colno})") from None
            except ValueError as e:            # what _parse_line found wrong
                raise WorkloadError(where + str(e)) from None
            if req.id in seen:
                raise WorkloadError(where + f"duplicate id {req.id!r} (first used on line "
                                            f"{seen[req.id]})")
            if requests and req.arrival_s < requests[-1].arrival_s:
                raise WorkloadError(where + f"arrival_s {req.arrival_s} is earlier than the "
                                    f"previous request's {requests[-1].arrival_s}; requests "
                                    "must be in arrival order")
            seen[req.id] = lineno
            requests.append(req)
    return requests


def save_jsonl(requests: list[Request], path) -> None:
    """Write ``requests`` as :func:`load_jsonl` reads them: a text ``prompt`` as text (encoded
    again on loading), default values left out."""
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            prompt = {"prompt": r.prompt} if r.prompt is not None else {
                "prompt_tokens": [int(t) for t in r.prompt_tokens]}
            obj = {"id": r.id, **prompt, "max_new_tokens": r.max_new_tokens}
            if r.arrival_s != 0:
                obj["arrival_s"] = r.arrival_s
            if r.ignore_eos:
                obj["ignore_eos"] = True
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ workloads

def chat_workload(tokenizer, n: int | None = None, max_new_tokens: int = 128) -> list[Request]:
    """The first ``n`` messages of ``data/chat.jsonl`` (all when None) in the chat template, each
    generating up to ``max_new_tokens`` (stopping at end-of-sequence). Past the end of the file
    the messages come round again, the round in the id: ``"chat-003#2"``."""
    with open(CHAT_FILE, encoding="utf-8") as f:
        chats = [json.loads(line) for line in f if line.strip()]     # {"id": ..., "prompt": ...}
    k = len(chats)
    n = k if n is None else n
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    encoded = [encode_chat(tokenizer, chat["prompt"]) for chat in chats[:n]]
    return [Request(chat["id"] if i < k else f"{chat['id']}#{i // k + 1}", list(encoded[i % k]),
                    max_new_tokens, prompt=chat["prompt"])
            for i, chat in zip(range(n), cycle(chats))]


def _random_prompts(rng, lengths, vocab_size: int) -> list[list[int]]:
    """Prompts of random ids in ``[3, vocab_size)`` (never the special ids 0-2: padding, begin
    and end of sequence), the i-th ``lengths[i]`` long."""
    if vocab_size <= 3:
        raise ValueError(f"vocab_size must be > 3, got {vocab_size}")
    return [rng.integers(3, vocab_size, size=int(k)).tolist() for k in lengths]


def _synthetic(kind: str, prompts, outputs) -> list[Request]:
    return [Request(id=f"{kind}-{i:04d}", prompt_tokens=p, max_new_tokens=int(o), ignore_eos=True)
            for i, (p, o) in enumerate(zip(prompts, outputs))]


def anyscale_workload(n: int, vocab_size: int, prompt_len: int = 512, mean_output: float = 128,
                      cap: int = 512, seed: int = 0) -> list[Request]:
    """Anyscale's continuous-batching benchmark: ``n`` random prompts of ``prompt_len`` tokens,
    output lengths exponential of mean ``mean_output``, rounded up and capped at ``cap``, each
    generated in full (end-of-sequence ignored). The same ``seed`` gives the same workload."""
    for name, value, low in (("n", n, 0), ("prompt_len", prompt_len, 1), ("cap", cap, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not mean_output > 0:
        raise ValueError(f"mean_output must be > 0, got {mean_output}")
    rng = np.random.default_rng(seed)
    prompts = _random_prompts(rng, [prompt_len] * n, vocab_size)
    outputs = np.clip(np.ceil(rng.exponential(mean_output, size=n)), 1, cap)
    return _synthetic("anyscale", prompts, outputs)


def lognormal_workload(n: int, vocab_size: int, prompt_median: float = 300,
                       output_median: float = 180, sigma: float = 0.6, prompt_cap: int = 2048,
                       output_cap: int = 1024, seed: int = 0) -> list[Request]:
    """Prompt and output lengths as a chat service sees them (ShareGPT-like): lognormal with the
    given medians and spread ``sigma`` of the log (0.6: two thirds within x1.8 of the median),
    rounded and clipped to ``[1, cap]``. Random prompts, end-of-sequence ignored, seeded."""
    if n < 0 or not (prompt_median > 0 and output_median > 0 and sigma >= 0):
        raise ValueError(f"need n >= 0, medians > 0 and sigma >= 0; got n={n}, "
                         f"medians {prompt_median}, {output_median}, sigma {sigma}")
    rng = np.random.default_rng(seed)
    lengths = [np.clip(np.rint(rng.lognormal(np.log(m), sigma, size=n)), 1, cap)
               for m, cap in ((prompt_median, prompt_cap), (output_median, output_cap))]
    return _synthetic("lognormal", _random_prompts(rng, lengths[0], vocab_size), lengths[1])


def prefix_workload(n: int, vocab_size: int, prefixes: int = 8, prefix_len: int = 1024,
                    question_len: int = 64, mean_output: float = 128, cap: int = 512,
                    seed: int = 0) -> list[Request]:
    """``n`` requests that each start with one of ``prefixes`` system prompts of ``prefix_len``
    random tokens (drawn in turn), then a question of ``question_len`` random tokens of its own;
    output lengths as ``anyscale_workload``'s. Seeded; end-of-sequence ignored."""
    if min(prefixes, question_len) < 1 or prefix_len < 0:
        raise ValueError(f"need prefixes >= 1, prefix_len >= 0 and question_len >= 1; got "
                         f"{prefixes}, {prefix_len}, {question_len}")
    rng = np.random.default_rng(seed)
    systems = _random_prompts(rng, [prefix_len] * prefixes, vocab_size)
    questions = _random_prompts(rng, [question_len] * n, vocab_size)
    outputs = anyscale_workload(n, vocab_size, 1, mean_output, cap, seed)
    return _synthetic("prefix", [systems[i % prefixes] + q for i, q in enumerate(questions)],
                      [r.max_new_tokens for r in outputs])


def poisson_arrivals(requests: list[Request], rate: float, seed: int = 0) -> list[Request]:
    """Copies of ``requests`` arriving as a Poisson process of ``rate`` requests/s: independent
    exponential gaps of mean ``1 / rate``, the first request at time 0 (no idle start)."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=max(len(requests) - 1, 0))
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)])
    return [replace(r, arrival_s=float(t)) for r, t in zip(requests, arrivals)]


# --------------------------------------------------------------- load by name

# workload -> (function, {spec key: (its argument, type)})
SYNTHETIC = {
    "anyscale": (anyscale_workload, {"prompt_len": ("prompt_len", int), "cap": ("cap", int),
                                     "mean": ("mean_output", float)}),
    "lognormal": (lognormal_workload, {k: (k, t) for k, t in (
        ("prompt_median", float), ("output_median", float), ("sigma", float),
        ("prompt_cap", int), ("output_cap", int))}),
    "prefix": (prefix_workload, {k: (k, int) for k in ("prefixes", "prefix_len", "question_len",
                                                       "cap")} | {"mean": ("mean_output", float)}),
}
_SPEC_FORMS = ("'chat', 'anyscale', 'anyscale:prompt_len=64,cap=128,mean=64', 'lognormal', "
               "'lognormal:prompt_median=300,output_median=180,sigma=0.6,prompt_cap=2048,"
               "output_cap=1024', 'prefix:prefixes=8,prefix_len=1024,question_len=64,mean=128,"
               "cap=512' (every key optional), or a path to a .jsonl file")


def _parse_params(spec: str, text: str, keys: dict) -> dict:
    """``key=value,...`` -> the workload function's keyword arguments."""
    params: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq:
            raise WorkloadError(f"workload {spec!r}: expected key=value, got {item!r}")
        if key not in keys:
            raise WorkloadError(f"workload {spec!r}: unknown key {key!r}; "
                                f"valid keys are {sorted(keys)}")
        arg, kind = keys[key]
        if arg in params:
            raise WorkloadError(f"workload {spec!r}: key {key!r} given twice")
        try:
            params[arg] = kind(value)
        except ValueError:
            raise WorkloadError(f"workload {spec!r}: {key} must be {kind.__name__}, "
                                f"got {value!r}") from None
    return params


def load_workload(spec: str, tokenizer=None, n: int | None = None, vocab_size: int | None = None,
                  seed: int = 0, max_new_tokens: int | None = None) -> list[Request]:
    """Build a workload from a short spec:

    * ``"chat"``: :func:`chat_workload` (needs ``tokenizer``), ``max_new_tokens`` default 128;
    * ``"anyscale"``, ``"lognormal"``, ``"prefix"``, optionally with settings
      (``"anyscale:mean=64"``): ``SYNTHETIC``'s random prompts, ``n`` requests (default 512), token
      ids below ``vocab_size`` (default ``len(tokenizer)``), drawn with ``seed``;
    * ``"path/to/file.jsonl"``: :func:`load_jsonl`, the first ``n`` requests (None: all).

    For synthetic and ``.jsonl`` workloads a given ``max_new_tokens`` is an upper limit.
    """
    if n is not None and n < 0:
        raise WorkloadError(f"n must be >= 0, got {n}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise WorkloadError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if spec == "chat":
        if tokenizer is None:
            raise WorkloadError("workload 'chat' needs a tokenizer")
        return chat_workload(tokenizer, n, 128 if max_new_tokens is None else max_new_tokens)

    name, _, settings = spec.partition(":")
    if name in SYNTHETIC:
        make, keys = SYNTHETIC[name]
        params = _parse_params(spec, settings, keys)
        if vocab_size is None:
            if tokenizer is None:
                raise WorkloadError(f"workload {spec!r} needs vocab_size (or a tokenizer)")
            vocab_size = len(tokenizer)
        try:
            requests = make(512 if n is None else n, vocab_size, seed=seed, **params)
        except ValueError as e:
            raise WorkloadError(f"workload {spec!r}: {e}") from None
    elif spec.endswith(".jsonl"):
        if not Path(spec).is_file():
            raise WorkloadError(f"workload file {spec!r} not found")
        requests = load_jsonl(spec, tokenizer, vocab_size)[:n]
    elif Path(spec).is_file():
        raise WorkloadError(f"workload file {spec!r} is not a .jsonl file (one JSON object per "
                            f"line, named *.jsonl)")
    else:
        raise WorkloadError(f"unknown workload {spec!r}; valid forms: {_SPEC_FORMS}")
    return requests if max_new_tokens is None else [
        replace(r, max_new_tokens=min(r.max_new_tokens, max_new_tokens)) for r in requests]


def interference_workload(tokenizer, vocab_size: int, n_chat: int = 4, n_long: int = 3,
                          long_len: int = 512, first_long_s: float = 1.0, gap_s: float = 1.0,
                          max_new_tokens: int = 64, seed: int = 0) -> list:
    """Chat requests that start decoding at once, and long prompts that arrive while they do:
    the workload that shows how a prefill stalls everybody else's decoding (chapter 05)."""
    chat = chat_workload(tokenizer, n=n_chat, max_new_tokens=max_new_tokens)
    long = anyscale_workload(n_long, vocab_size, prompt_len=long_len, mean_output=8, cap=8,
                             seed=seed)
    for i, r in enumerate(long):
        r.id, r.arrival_s = f"long-{i}", first_long_s + i * gap_s
    return chat + long
