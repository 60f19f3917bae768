"""Input lines of a batch job: parse, validate, split between processes.

One JSON object per line::

  {"id": "a1", "prompt": "def f(x):", "max_tokens": 32, "temperature": 0.8,
   "top_p": 0.95, "top_k": 40, "seed": 7, "stop": ["\\n\\n"]}

``id`` (string or integer, unique) and one of ``prompt`` (text, needs a tokenizer) or
``prompt_ids`` (token ids) are required; the sampling fields default to the job's
:class:`Defaults`. ``stop`` is a string or a list of strings matched on the output text
(the text is cut before the first match). Any other field, a value of the wrong type or
range, a duplicate id (the later line) or a prompt that does not fit the cache makes the
line a *reject* ``{"line", "id", "error"}``; the job goes on with the other lines.

Seeds: a line's ``seed`` is its row's seed as given (``PRNGKey(seed)``, the same stream
as the server's ``seed`` or one entry of ``SpecDecoder.generate(seed=[...])``). A line
without one gets ``row_seed(job seed, crc32(id))``: it depends only on the job's
``--seed`` and the line's id, never on the batch it lands in, the number of processes or
restarts.

Multi-process split: process ``p`` of ``P`` owns the lines whose id hashes to it,
``crc32(canonical id) % P`` (so both copies of a duplicate id meet in one process), and
lines without a readable id by line number, ``(line - 1) % P``. Every process scans the
whole file but parses, tokenizes and decodes only its own lines.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from moesd_jax.spec.decoder import row_seed

FIELDS = ("id", "prompt", "prompt_ids", "max_tokens", "temperature", "top_p", "top_k", "seed",
          "stop")
MAX_STOP_STRINGS = 8


@dataclasses.dataclass(frozen=True)
class Defaults:
    """Sampling values for lines that leave a field out (the CLI's flags)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a prompt must fit: token ids in [0, vocab); prompt + max_tokens + k + 1 <=
    max_len (the decoder's cache capacity, ``k_eff`` draft nodes per step)."""

    vocab: int
    max_len: int
    k_eff: int


@dataclasses.dataclass(frozen=True)
class Request:
    """One valid input line, resolved (defaults applied, seed derived, text tokenized)."""

    id: str | int
    line: int  # 1-based line number in the input file
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stops: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return id_key(self.id)


class LineError(ValueError):
    """A rejected input line (the message names the field and value)."""


def id_key(x) -> str:
    """Canonical form of an id: ``"7"`` and ``7`` are different ids."""
    return json.dumps(x, ensure_ascii=False)


def owner(key: str | None, line: int, num_processes: int) -> int:
    """The process that handles a line (see the module doc)."""
    if key is None:
        return (line - 1) % num_processes
    return zlib.crc32(key.encode()) % num_processes


def default_seed(job_seed: int, key: str) -> int:
    """Seed of a line without ``seed``: ``row_seed(job_seed, crc32(canonical id))``."""
    return row_seed(job_seed, zlib.crc32(key.encode()))


def _int(obj: dict, name: str, default: int, lo: int, hi: int | None = None) -> int:
    x = obj.get(name, default)
    if isinstance(x, bool) or not isinstance(x, int):
        raise LineError(f"{name}={x!r} must be an integer")
    if x < lo or (hi is not None and x >= hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise LineError(f"{name}={x} must be {rng}")
    return x


def _float(obj: dict, name: str, default: float) -> float:
    x = obj.get(name, default)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise LineError(f"{name}={x!r} must be a number")
    return float(x)


def parse_line(obj, line: int, defaults: Defaults, limits: Limits, tokenizer) -> Request:
    """Validates one decoded JSON line. Raises :class:`LineError` naming the problem."""
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise LineError(f"unknown field {unknown[0]!r} (known: {', '.join(FIELDS)})")
    if "id" not in obj:
        raise LineError("missing field 'id'")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise LineError(f"id={rid!r} must be a non-empty string or an integer")
    if ("prompt" in obj) == ("prompt_ids" in obj):
        raise LineError("give exactly one of 'prompt' (text) and 'prompt_ids' (token ids)")
    if "prompt" in obj:
        text = obj["prompt"]
        if not isinstance(text, str):
            raise LineError(f"prompt={text!r} must be a string (token ids go in prompt_ids)")
        if tokenizer is None:
            raise LineError("'prompt' text needs a tokenizer and the model has none; send "
                            "'prompt_ids'")
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    else:
        ids = obj["prompt_ids"]
        if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int)
                                            for t in ids):
            raise LineError("prompt_ids must be a list of integers")
    if not ids:
        raise LineError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < limits.vocab]
    if bad:
        raise LineError(f"prompt token id {bad[0]} is outside [0, {limits.vocab})")
    max_tokens = _int(obj, "max_tokens", defaults.max_tokens, 1)
    temperature = _float(obj, "temperature", defaults.temperature)
    if temperature < 0:
        raise LineError(f"temperature={temperature} must be >= 0")
    top_p = _float(obj, "top_p", defaults.top_p)
    if not 0.0 < top_p <= 1.0:
        raise LineError(f"top_p={top_p} must be in (0, 1]")
    top_k = _int(obj, "top_k", defaults.top_k, -1)
    key = id_key(rid)
    seed = (_int(obj, "seed", 0, 0, 2**31) if "seed" in obj
            else default_seed(defaults.seed, key))
    stop = obj.get("stop", [])
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        raise LineError(f"stop={stop!r} must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP_STRINGS:
        raise LineError(f"stop: {len(stops)} strings given, at most {MAX_STOP_STRINGS}")
    if stops and tokenizer is None:
        raise LineError("'stop' strings need a tokenizer and the model has none")
    need = len(ids) + max_tokens + limits.k_eff + 1
    if need > limits.max_len:
        raise LineError(f"prompt too long: prompt tokens ({len(ids)}) + max_tokens "
                        f"({max_tokens}) + k + 1 ({limits.k_eff + 1}) = {need} exceeds the "
                        f"cache capacity max_len={limits.max_len}")
    return Request(rid, line, tuple(ids), max_tokens, temperature, top_p, max(top_k, 0), seed,
                   tuple(stops))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            yield n, raw.decode("utf-8", errors="replace")


def read_requests(path: str | Path, defaults: Defaults, limits: Limits, tokenizer=None, *,
                  process: int = 0, num_processes: int = 1
                  ) -> tuple[list[Request], list[dict]]:
    """This process's valid requests and rejects from a JSONL file.

    Blank lines are skipped. Returns ``(requests in file order, rejects)``, each reject
    ``{"line": n, "id": id or None, "error": message}``.
    """
    requests: list[Request] = []
    rejects: list[dict] = []
    first_line: dict[str, int] = {}
    for n, text in _lines(Path(path)):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError as e:
            if owner(None, n, num_processes) == process:
                rejects.append({"line": n, "id": None, "error": f"not valid JSON ({e})"})
            continue
        rid = obj.get("id") if isinstance(obj, dict) else None
        key = (id_key(rid) if rid is not None and not isinstance(rid, (dict, list, float))
               else None)
        if owner(key, n, num_processes) != process:
            continue
        try:
            if key is not None and key in first_line:
                raise LineError(f"duplicate id {rid!r} (first on line {first_line[key]})")
            if key is not None:
                first_line[key] = n
            requests.append(parse_line(obj, n, defaults, limits, tokenizer))
        except LineError as e:
            rejects.append({"line": n, "id": rid if key is not None else None, "error": str(e)})
    return requests, rejects
