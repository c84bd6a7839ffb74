"""Requests and workloads: what the batching schedulers of the course are fed.

A *request* is one prompt (already turned into token ids) plus how many tokens
to generate for it and when it arrives.  A *workload* is a list of requests.
The course uses three kinds:

* ``chat``     -- real user messages from ``course_lib/data/chat.jsonl``; the
                  answers stop at the model's end-of-sequence token, so their
                  lengths vary a lot ("Hi" vs "Write a short story ...").
* ``anyscale`` -- the synthetic workload of Anyscale's continuous-batching
                  benchmark: random prompts of a fixed length and output
                  lengths drawn from an exponential distribution, generated
                  with ``ignore_eos=True`` so each request produces exactly its
                  drawn number of tokens.
* ``lognormal`` -- random prompts with prompt and output lengths spread as a chat service's
                  (lognormal), end-of-sequence ignored.
* ``prefix``   -- random questions after one of a few shared system prompts (prefix caching).
* a ``.jsonl`` file of your own, one request per line (see :func:`load_jsonl`).

:func:`load_workload` picks one of them from a short text spec, and
:func:`poisson_arrivals` spreads a workload out in time like real traffic.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
CHAT_FILE = DATA_DIR / "chat.jsonl"


@dataclass
class Request:
    """One generation request.

    ``prompt_tokens`` are the token ids fed to the model (for chat prompts,
    the full chat template around the user message).  ``max_new_tokens`` is
    the most tokens to generate; with ``ignore_eos=True`` exactly that many
    are generated even if the model emits its end-of-sequence token.
    ``arrival_s`` is when the request reaches the server, in seconds from the
    start of the run.  ``prompt`` keeps the user message when the request was
    given as text.
    """

    id: str
    prompt_tokens: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    ignore_eos: bool = False
    prompt: str | None = None  # the user message, when the request was given as text


class WorkloadError(ValueError):
    """A workload file or workload spec is malformed."""


class RequestError(ValueError):
    """A request cannot be served (e.g. it does not fit the model's context)."""


def validate(req: Request, max_context: int, vocab_size: int | None = None) -> None:
    """Check that ``req`` can be served by a model with ``max_context`` positions (and, given
    ``vocab_size``, that every prompt token id is one of its ``vocab_size`` ids).

    Raises :class:`RequestError` naming the request and the problem; returns
    None when the request is fine.
    """
    where = f"request {req.id!r}"
    if len(req.prompt_tokens) == 0:
        raise RequestError(f"{where}: empty prompt (no prompt tokens)")
    if vocab_size is not None:
        bad = check_token_ids(req.prompt_tokens, vocab_size)
        if bad:
            raise RequestError(f"{where}: {bad}")
    if req.max_new_tokens < 1:
        raise RequestError(f"{where}: max_new_tokens must be >= 1, got {req.max_new_tokens}")
    total = len(req.prompt_tokens) + req.max_new_tokens
    if total > max_context:
        raise RequestError(
            f"{where}: prompt ({len(req.prompt_tokens)} tokens) + max_new_tokens "
            f"({req.max_new_tokens}) = {total} tokens, longer than max_context {max_context}"
        )
    if req.arrival_s < 0:
        raise RequestError(f"{where}: arrival_s must be >= 0, got {req.arrival_s}")


def check_token_ids(tokens, vocab_size: int) -> str | None:
    """What is wrong with ``tokens`` as ids of a vocabulary of ``vocab_size`` (None: nothing):
    an id the model has no embedding for would fail deep inside the forward pass."""
    for i, t in enumerate(tokens):
        if not 0 <= t < vocab_size:
            return (f"prompt token id {t} (position {i}) is outside the model's vocabulary "
                    f"of {vocab_size} ids (0 to {vocab_size - 1})")
    return None


def encode_chat(tokenizer, message: str, system: str | None = None) -> list[int]:
    """Token ids of ``message`` as a single user turn, ready for the assistant's answer, after
    ``system`` as the system prompt (None: the template's own).

    The tokenizer's chat template wraps the message (for SmolLM2:
    ``<|im_start|>system ... <|im_end|> <|im_start|>user\\n{message}<|im_end|>
    <|im_start|>assistant\\n``).  We render the template to text and tokenize
    that text without adding special tokens again: ``apply_chat_template(...,
    tokenize=True)`` returns a ``BatchEncoding`` (a dict) in transformers 5,
    not a list, so going through text gives a plain ``list[int]`` on every
    version.
    """
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}] * (system is not None)
        + [{"role": "user", "content": message}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(t) for t in ids]


# ----------------------------------------------------------------- jsonl files

_KEYS = {"id", "prompt", "prompt_tokens", "max_new_tokens", "arrival_s", "ignore_eos"}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _parse_line(obj, tokenizer, vocab_size: int | None = None) -> Request:
    """Turn one decoded JSON line into a Request; raises ValueError with the problem."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed keys are {sorted(_KEYS)}")

    if "id" not in obj:
        raise ValueError("missing key 'id'")
    rid = obj["id"]
    if not (isinstance(rid, str) or _is_int(rid)):
        raise ValueError(f"'id' must be a string or an integer, got {rid!r}")
    rid = str(rid)

    if "max_new_tokens" not in obj:
        raise ValueError("missing key 'max_new_tokens'")
    max_new = obj["max_new_tokens"]
    if not _is_int(max_new) or max_new < 1:
        raise ValueError(f"'max_new_tokens' must be an integer >= 1, got {max_new!r}")

    has_text, has_tokens = "prompt" in obj, "prompt_tokens" in obj
    if has_text and has_tokens:
        raise ValueError("give either 'prompt' or 'prompt_tokens', not both")
    if not (has_text or has_tokens):
        raise ValueError("missing key: one of 'prompt' or 'prompt_tokens' is required")
    prompt = None
    if has_text:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a string, got {prompt!r}")
        if not prompt.strip():
            raise ValueError("'prompt' is empty")
        if tokenizer is None:
            raise ValueError("'prompt' is text, so a tokenizer is needed to encode it")
        tokens = encode_chat(tokenizer, prompt)
    else:
        tokens = obj["prompt_tokens"]
        if not isinstance(tokens, list) or not all(_is_int(t) and t >= 0 for t in tokens):
            raise ValueError("'prompt_tokens' must be a list of non-negative integers")
        if not tokens:
            raise ValueError("'prompt_tokens' is empty")
        if vocab_size is not None:
            bad = check_token_ids(tokens, vocab_size)
            if bad:
                raise ValueError(bad)

    arrival = obj.get("arrival_s", 0.0)
    if not _is_number(arrival) or not math.isfinite(arrival) or arrival < 0:
        raise ValueError(f"'arrival_s' must be a number >= 0, got {arrival!r}")

    ignore_eos = obj.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ValueError(f"'ignore_eos' must be true or false, got {ignore_eos!r}")

    return Request(
        id=rid,
        prompt_tokens=list(tokens),
        max_new_tokens=max_new,
        arrival_s=float(arrival),
        ignore_eos=ignore_eos,
        prompt=prompt,
    )


def load_jsonl(path, tokenizer=None, vocab_size: int | None = None) -> list[Request]:
    """Read requests from a JSON-lines file, one request per line.

    Each line is an object with the keys

    * ``id`` (string or integer, required, unique),
    * exactly one of ``prompt`` (a user message; the chat template is applied,
      so a ``tokenizer`` is needed) or ``prompt_tokens`` (a list of token ids),
    * ``max_new_tokens`` (integer >= 1, required),
    * ``arrival_s`` (number >= 0, optional, default 0; must not go backwards
      from one line to the next),
    * ``ignore_eos`` (true/false, optional, default false).

    Given ``vocab_size``, every prompt token id must be below it (text prompts are encoded
    by the model's own tokenizer).  Blank lines are skipped.  Any problem raises
    :class:`WorkloadError` with a message starting ``"<path>:<line>: "``.
    """
    requests: list[Request] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}: "
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise WorkloadError(where + "not UTF-8 text: a .jsonl file holds one JSON "
                                    "object per line") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorkloadError(where + f"invalid JSON: {e.msg} (column {e.colno})") from None
            try:
                req = _parse_line(obj, tokenizer, vocab_size)
            except ValueError as e:
                raise WorkloadError(where + str(e)) from None
            if req.id in seen:
                raise WorkloadError(where + f"duplicate id {req.id!r} (first used on line "
                                            f"{seen[req.id]})")
            if requests and req.arrival_s < requests[-1].arrival_s:
                raise WorkloadError(
                    where + f"arrival_s {req.arrival_s} is earlier than the previous "
                    f"request's {requests[-1].arrival_s}; requests must be in arrival order"
                )
            seen[req.id] = lineno
            requests.append(req)
    return requests


def save_jsonl(requests: list[Request], path) -> None:
    """Write ``requests`` in the format :func:`load_jsonl` reads.

    A request given as text keeps its ``prompt`` (re-encoded on loading);
    otherwise its ``prompt_tokens`` are written.  Default values
    (``arrival_s=0``, ``ignore_eos=false``) are left out.
    """
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            obj: dict = {"id": r.id}
            if r.prompt is not None:
                obj["prompt"] = r.prompt
            else:
                obj["prompt_tokens"] = [int(t) for t in r.prompt_tokens]
            obj["max_new_tokens"] = r.max_new_tokens
            if r.arrival_s != 0:
                obj["arrival_s"] = r.arrival_s
            if r.ignore_eos:
                obj["ignore_eos"] = True
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ workloads

def _chat_prompts() -> list[tuple[str, str]]:
    """The (id, user message) pairs of ``data/chat.jsonl``."""
    pairs = []
    with open(CHAT_FILE, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                pairs.append((obj["id"], obj["prompt"]))
    return pairs


def chat_workload(tokenizer, n: int | None = None, max_new_tokens: int = 128) -> list[Request]:
    """Real chat messages, encoded with the tokenizer's chat template.

    Takes the first ``n`` prompts of ``course_lib/data/chat.jsonl`` (all of
    them when ``n`` is None).  When ``n`` is larger than the file, the prompts
    are reused in order, with the round added to the id: ``"chat-003#2"`` is
    the second use of ``"chat-003"``.  Every request may generate up to
    ``max_new_tokens`` tokens and stops early at end-of-sequence.
    """
    pairs = _chat_prompts()
    if n is None:
        n = len(pairs)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    cache: dict[str, list[int]] = {}
    requests = []
    for i in range(n):
        base_id, message = pairs[i % len(pairs)]
        round_ = i // len(pairs) + 1
        if base_id not in cache:
            cache[base_id] = encode_chat(tokenizer, message)
        requests.append(
            Request(
                id=base_id if round_ == 1 else f"{base_id}#{round_}",
                prompt_tokens=list(cache[base_id]),
                max_new_tokens=max_new_tokens,
                prompt=message,
            )
        )
    return requests


def _random_prompts(rng, n: int, lengths, vocab_size: int) -> list[list[int]]:
    """``n`` prompts of random ids in ``[3, vocab_size)`` (never the special ids 0-2: padding,
    begin and end of sequence), the i-th ``lengths[i]`` long."""
    if vocab_size <= 3:
        raise ValueError(f"vocab_size must be > 3, got {vocab_size}")
    return [rng.integers(3, vocab_size, size=int(k)).tolist() for k in lengths]


def _synthetic(kind: str, prompts, outputs) -> list[Request]:
    return [Request(id=f"{kind}-{i:04d}", prompt_tokens=p, max_new_tokens=int(o), ignore_eos=True)
            for i, (p, o) in enumerate(zip(prompts, outputs))]


def anyscale_workload(n: int, vocab_size: int, prompt_len: int = 512, mean_output: float = 128,
                      cap: int = 512, seed: int = 0) -> list[Request]:
    """The synthetic workload of Anyscale's continuous-batching benchmark: ``n`` random prompts
    of exactly ``prompt_len`` tokens, output lengths drawn from an exponential distribution of
    mean ``mean_output``, rounded up and capped at ``cap``. Every request ignores end-of-sequence,
    so it generates exactly its drawn length. The same ``seed`` gives the same workload."""
    for name, value, low in (("n", n, 0), ("prompt_len", prompt_len, 1), ("cap", cap, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not mean_output > 0:
        raise ValueError(f"mean_output must be > 0, got {mean_output}")
    rng = np.random.default_rng(seed)
    prompts = _random_prompts(rng, n, [prompt_len] * n, vocab_size)
    outputs = np.clip(np.ceil(rng.exponential(mean_output, size=n)), 1, cap)
    return _synthetic("anyscale", prompts, outputs)


def lognormal_workload(n: int, vocab_size: int, prompt_median: float = 300,
                       output_median: float = 180, sigma: float = 0.6, prompt_cap: int = 2048,
                       output_cap: int = 1024, seed: int = 0) -> list[Request]:
    """Prompt and output lengths as a chat service sees them (ShareGPT-like): each drawn from a
    lognormal distribution with the given median and spread ``sigma`` (of the log; 0.6 puts
    two thirds of the lengths within x1.8 of the median), rounded and clipped to
    ``[1, cap]``. Random prompts, end-of-sequence ignored, seeded as ``anyscale_workload``."""
    if n < 0 or not (prompt_median > 0 and output_median > 0 and sigma >= 0):
        raise ValueError(f"need n >= 0, medians > 0 and sigma >= 0; got n={n}, "
                         f"medians {prompt_median}, {output_median}, sigma {sigma}")
    rng = np.random.default_rng(seed)
    lengths = [np.clip(np.rint(rng.lognormal(np.log(m), sigma, size=n)), 1, cap)
               for m, cap in ((prompt_median, prompt_cap), (output_median, output_cap))]
    return _synthetic("lognormal", _random_prompts(rng, n, lengths[0], vocab_size), lengths[1])


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
    systems = _random_prompts(rng, prefixes, [prefix_len] * prefixes, vocab_size)
    questions = _random_prompts(rng, n, [question_len] * n, vocab_size)
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
    return [dataclasses.replace(r, arrival_s=float(t)) for r, t in zip(requests, arrivals)]


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
    """Build a workload from a short spec.

    * ``"chat"``: :func:`chat_workload` (needs ``tokenizer``); ``n`` prompts (all when None),
      each generating up to ``max_new_tokens`` (default 128).
    * ``"anyscale"``, ``"lognormal"``, ``"prefix"``, optionally with settings
      (``"anyscale:mean=64"``): the synthetic workloads of ``SYNTHETIC``, ``n`` requests
      (default 512), token ids below ``vocab_size`` (default: ``len(tokenizer)``), drawn with
      ``seed``.
    * ``"path/to/file.jsonl"``: :func:`load_jsonl`, truncated to the first ``n`` requests.

    For synthetic and ``.jsonl`` workloads a given ``max_new_tokens`` is an upper limit.
    """
    if n is not None and n < 0:
        raise WorkloadError(f"n must be >= 0, got {n}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise WorkloadError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    def limited(requests: list[Request]) -> list[Request]:
        if max_new_tokens is None:
            return requests
        return [dataclasses.replace(r, max_new_tokens=min(r.max_new_tokens, max_new_tokens))
                for r in requests]

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
            return limited(make(512 if n is None else n, vocab_size, seed=seed, **params))
        except ValueError as e:
            raise WorkloadError(f"workload {spec!r}: {e}") from None

    if spec.endswith(".jsonl"):
        if not Path(spec).is_file():
            raise WorkloadError(f"workload file {spec!r} not found")
        requests = load_jsonl(spec, tokenizer, vocab_size)
        return limited(requests if n is None else requests[:n])

    if Path(spec).is_file():
        raise WorkloadError(f"workload file {spec!r} is not a .jsonl file (one JSON object per "
                            f"line, named *.jsonl)")

    raise WorkloadError(f"unknown workload {spec!r}; valid forms: {_SPEC_FORMS}")


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
