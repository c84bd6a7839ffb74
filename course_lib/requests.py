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


def encode_chat(tokenizer, message: str) -> list[int]:
    """Token ids of ``message`` as a single user turn, ready for the assistant's answer.

    The tokenizer's chat template wraps the message (for SmolLM2:
    ``<|im_start|>system ... <|im_end|> <|im_start|>user\\n{message}<|im_end|>
    <|im_start|>assistant\\n``).  We render the template to text and tokenize
    that text without adding special tokens again: ``apply_chat_template(...,
    tokenize=True)`` returns a ``BatchEncoding`` (a dict) in transformers 5,
    not a list, so going through text gives a plain ``list[int]`` on every
    version.
    """
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}],
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
                raise WorkloadError(where + f"duplicate id {req.id!r} (first used on line {seen[req.id]})")
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


def anyscale_workload(
    n: int,
    vocab_size: int,
    prompt_len: int = 512,
    mean_output: float = 128,
    cap: int = 512,
    seed: int = 0,
) -> list[Request]:
    """The synthetic workload of Anyscale's continuous-batching benchmark.

    ``n`` prompts of exactly ``prompt_len`` random token ids (drawn from
    ``[3, vocab_size)`` so that the usual special ids 0-2 -- padding,
    begin/end of sequence -- never appear), and output lengths drawn from an
    exponential distribution with mean ``mean_output``, rounded up (so at
    least 1) and capped at ``cap``.  Requests use ``ignore_eos=True``: each
    generates exactly its drawn length.  The same ``seed`` gives the same
    workload.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if vocab_size <= 3:
        raise ValueError(f"vocab_size must be > 3, got {vocab_size}")
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    if not mean_output > 0:
        raise ValueError(f"mean_output must be > 0, got {mean_output}")
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, vocab_size, size=(n, prompt_len))
    outputs = np.ceil(rng.exponential(mean_output, size=n))
    outputs = np.clip(outputs, 1, cap).astype(int)
    return [
        Request(
            id=f"anyscale-{i:04d}",
            prompt_tokens=prompts[i].tolist(),
            max_new_tokens=int(outputs[i]),
            ignore_eos=True,
        )
        for i in range(n)
    ]


def poisson_arrivals(requests: list[Request], rate: float, seed: int = 0) -> list[Request]:
    """Copies of ``requests`` arriving as a Poisson process of ``rate`` requests/s.

    The gaps between consecutive arrivals are independent exponential draws
    with mean ``1 / rate``.  The first request arrives at time 0 (so a run
    does not start with idle time), the k-th at the sum of the first k - 1
    gaps.  The originals are not changed.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=max(len(requests) - 1, 0))
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)])
    return [dataclasses.replace(r, arrival_s=float(t)) for r, t in zip(requests, arrivals)]


# --------------------------------------------------------------- load by name

_SPEC_FORMS = (
    "'chat', 'anyscale', 'anyscale:prompt_len=64,cap=128,mean=64' "
    "(keys prompt_len, cap, mean, all optional), or a path to a .jsonl file"
)
_ANYSCALE_KEYS = {"prompt_len": int, "cap": int, "mean": float}


def _parse_anyscale_params(spec: str, text: str) -> dict:
    params: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise WorkloadError(f"workload {spec!r}: expected key=value, got {item!r}")
        if key not in _ANYSCALE_KEYS:
            raise WorkloadError(
                f"workload {spec!r}: unknown key {key!r}; valid keys are {sorted(_ANYSCALE_KEYS)}"
            )
        if key in params:
            raise WorkloadError(f"workload {spec!r}: key {key!r} given twice")
        try:
            params[key] = _ANYSCALE_KEYS[key](value.strip())
        except ValueError:
            raise WorkloadError(
                f"workload {spec!r}: {key} must be {_ANYSCALE_KEYS[key].__name__}, got {value!r}"
            ) from None
    return params


def load_workload(
    spec: str,
    tokenizer=None,
    n: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> list[Request]:
    """Build a workload from a short spec.

    * ``"chat"``: :func:`chat_workload` (needs ``tokenizer``); ``n`` prompts
      (all when None), each generating up to ``max_new_tokens`` (default 128).
    * ``"anyscale"`` or ``"anyscale:prompt_len=64,cap=128,mean=64"``:
      :func:`anyscale_workload` with ``n`` requests (default 512), token ids
      below ``vocab_size`` (default: ``len(tokenizer)``) and ``seed``.
    * ``"path/to/file.jsonl"``: :func:`load_jsonl`, truncated to the first
      ``n`` requests.

    For ``anyscale`` and ``.jsonl`` workloads, a given ``max_new_tokens``
    is an upper limit: longer requests are shortened to it.
    """
    if n is not None and n < 0:
        raise WorkloadError(f"n must be >= 0, got {n}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise WorkloadError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    def limited(requests: list[Request]) -> list[Request]:
        if max_new_tokens is None:
            return requests
        return [
            dataclasses.replace(r, max_new_tokens=min(r.max_new_tokens, max_new_tokens))
            for r in requests
        ]

    if spec == "chat":
        if tokenizer is None:
            raise WorkloadError("workload 'chat' needs a tokenizer")
        return chat_workload(tokenizer, n, 128 if max_new_tokens is None else max_new_tokens)

    if spec == "anyscale" or spec.startswith("anyscale:"):
        params = _parse_anyscale_params(spec, spec.partition(":")[2])
        if vocab_size is None:
            if tokenizer is None:
                raise WorkloadError(f"workload {spec!r} needs vocab_size (or a tokenizer)")
            vocab_size = len(tokenizer)
        try:
            requests = anyscale_workload(
                512 if n is None else n,
                vocab_size,
                prompt_len=params.get("prompt_len", 512),
                mean_output=params.get("mean", 128),
                cap=params.get("cap", 512),
                seed=seed,
            )
        except ValueError as e:
            raise WorkloadError(f"workload {spec!r}: {e}") from None
        return limited(requests)

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
    long = anyscale_workload(n_long, vocab_size, prompt_len=long_len, mean_output=8, cap=8, seed=seed)
    for i, r in enumerate(long):
        r.id, r.arrival_s = f"long-{i}", first_long_s + i * gap_s
    return chat + long
