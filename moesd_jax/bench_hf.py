"""Our AR and SD decoding vs Hugging Face transformers (PyTorch) on identical weights.

Behind ``scripts/bench.py hf``. The target and draft are exported with
:func:`moesd_jax.models.hf_export.export_hf` (float32) and loaded back with
``transformers.AutoModelForCausalLM``, so both sides compute the same function on the
same prompts; every output is compared token by token with HF greedy ``generate``.

Method: greedy, EOS disabled on both sides (every call makes exactly ``max_new_tokens``
tokens); one untimed warm-up call per method and batch size (our first call compiles);
then the methods run interleaved, group after group, so machine noise hits all alike.
Each ``generate`` call is timed by wall clock, prefill included for everyone; tokens/s of
a call = new tokens / its time; reported: the median over calls.

  batch 1   HF greedy, HF assisted generation (``assistant_model``, ``k`` draft tokens a
            round, constant schedule, no confidence cut-off), ours AR, ours SD (chain K).
  batch B   HF greedy (left padding, pad id 0, attention mask), ours AR, ours SD (ragged
            rows taken as they are). transformers' assisted generation is batch-1 only,
            so SD is set against HF greedy there.

Mean acceptance length: ours is 1 + accepted / iterations over all prompts (prefill not
an iteration); HF's is new tokens / target forward calls (its prefill is fused with the
first verification), both the tokens one target forward yields. XLA uses its own thread
pool over all CPUs; torch gets ``torch_threads``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PAD_ID = 0  # the bundled tokenizer has no pad token; left padding is masked out anyway
METHODS = ("hf_greedy", "hf_assisted", "ours_ar", "ours_sd")
# Measured on a 2-CPU host with another job running: HF greedy on the bundled target made
# 75 tok/s with 1 torch thread and 3 tok/s with 2 (the OpenMP threads wait on each other).
BUSY_HOST_NOTE = ("torch_threads >= the CPU count: on a host with other load torch's OpenMP "
                  "threads stall on each other (2 threads on a busy 2-CPU host: 20x slower "
                  "than 1); compare with fewer torch threads before reading the HF numbers")


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as e:  # torch is a test extra, not a runtime dependency
        raise ImportError(f"bench hf needs torch and transformers ({e}); "
                          "pip install -e '.[test]'") from e
    return torch, transformers


def load_torch_model(hf_dir: str | Path):
    """A float32 transformers model of ``hf_dir`` in eval mode, EOS stopping disabled."""
    torch, transformers = _import_torch()
    m = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None  # never stop early: exactly max_new_tokens
    m.generation_config.pad_token_id = PAD_ID
    m.generation_config.bos_token_id = None
    return m


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids_BT, mask_BT): prompts right-aligned in ``PAD_ID`` with 1 on real tokens."""
    t = max(len(p) for p in prompts)
    ids = np.full((len(prompts), t), PAD_ID, np.int64)
    mask = np.zeros((len(prompts), t), np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = p
        mask[i, t - len(p):] = 1
    return ids, mask


class _Ours:
    """One of our decoders as a runner; keeps the last call's results (their stats)."""

    def __init__(self, decoder, max_new: int):
        self.decoder, self.max_new, self.last = decoder, max_new, []

    def __call__(self, prompts) -> list[list[int]]:
        self.last = self.decoder.generate(prompts, self.max_new)
        return [r.token_ids for r in self.last]


class _HF:
    """HF greedy and assisted generation; counts target forward calls (acceptance)."""

    def __init__(self, target, draft, k: int, max_new: int):
        self.torch, _ = _import_torch()
        self.target, self.draft, self.max_new = target, draft, max_new
        gc = draft.generation_config
        gc.num_assistant_tokens = k
        gc.num_assistant_tokens_schedule = "constant"
        gc.assistant_confidence_threshold = 0.0
        self.calls = 0
        target.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def _generate(self, prompts, **kw) -> list[list[int]]:
        ids, mask = left_pad(prompts)
        out = self.target.generate(self.torch.from_numpy(ids),
                                   attention_mask=self.torch.from_numpy(mask),
                                   do_sample=False, max_new_tokens=self.max_new, **kw)
        return out[:, ids.shape[1]:].tolist()

    def greedy(self, prompts) -> list[list[int]]:
        return self._generate(prompts)

    def assisted(self, prompts) -> list[list[int]]:
        if len(prompts) != 1:
            raise ValueError("transformers' assisted generation takes one prompt at a time")
        return self._generate(prompts, assistant_model=self.draft)


def _load_avg() -> float | None:
    """The 1-minute load average (None where the OS has none): a result carries the load
    it ran under (see :data:`BUSY_HOST_NOTE`)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _first_diff(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first differing token (the shorter length if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def validate_args(num_prompts: int, max_new_tokens: int, batches: Sequence[int], k: int,
                  torch_threads: int) -> None:
    """Raises ValueError naming the first bad argument of :func:`compare_hf`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if torch_threads < 1:
        raise ValueError(f"torch_threads={torch_threads} must be >= 1")
    if 1 not in batches or any(b < 1 for b in batches) or len(set(batches)) != len(batches):
        raise ValueError(f"batches={list(batches)} must be distinct positive sizes including "
                         "1 (HF assisted generation runs at batch 1 only)")
    if max(batches) > num_prompts:
        raise ValueError(f"batch {max(batches)} needs at least that many prompts, got "
                         f"{num_prompts}")


def compare_hf(target, draft, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               batches: Sequence[int] = (1, 8), k: int = 4, torch_threads: int = 2) -> dict:
    """Times and compares HF greedy / assisted generation with our AR / SD decoding.

    Args:
      target: our target model (exportable by ``export_hf``: e.g. the bundled MoE).
      draft: our draft model (same vocabulary).
      prompts: token-id prompts; at batch B they run in groups of B (a ragged tail
        shorter than B is left out at that size).
      max_new_tokens: tokens every call generates (EOS disabled on both sides).
      batches: batch sizes to measure; must include 1.
      k: draft tokens per round (our chain length, HF ``num_assistant_tokens``).
      torch_threads: ``torch.set_num_threads`` for the HF side (restored afterwards).

    Returns:
      A JSON-able dict. Batch 1: ``ar_speedup_vs_hf`` (ours AR / HF greedy tokens/s),
      ``sd_speedup_vs_hf`` (ours SD / HF assisted), ``tokens_equal`` (all four equal to HF
      greedy on every prompt). For each B > 1: ``batch{B}_ar_speedup_vs_hf``,
      ``batch{B}_sd_speedup_vs_hf_greedy``, ``tokens_equal_batch{B}`` and
      ``rows_equal_fraction_batch{B}`` (rows where ours AR and SD both equal HF greedy).
      ``{method}_tok_s_batch{B}`` for methods ``hf_greedy``, ``hf_assisted`` (B = 1),
      ``ours_ar``, ``ours_sd``; ``ours_sd_mean_acceptance_length``,
      ``hf_assisted_mean_acceptance_length``; ``rows`` (one dict per batch size, for a
      table), ``mismatches`` (batch, prompt, method, first differing position), ``notes``,
      and the setup (prompts, prompt_tokens, max_new_tokens, k, torch_threads, versions,
      cpus, load_avg_1m at start and end).
    """
    from moesd_jax.config import SpecConfig
    from moesd_jax.models.hf_export import export_hf
    from moesd_jax.spec.decoder import SpecDecoder

    prompts = [list(map(int, p)) for p in prompts]
    batches = list(batches)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    validate_args(len(prompts), max_new_tokens, batches, k, torch_threads)
    torch, transformers = _import_torch()
    from moesd_jax.models import moe
    from moesd_jax.runtime import cpu_decode_layout

    with tempfile.TemporaryDirectory(prefix="moesd_bench_hf_") as tmp:
        hf_models = []
        for name, m in (("target", target), ("draft", draft)):
            # the export reads stacked experts; ours decode in the CPU layout after it
            moe.stack_experts(m)
            hf_models.append(load_torch_model(export_hf(m, Path(tmp) / name,
                                                        dtype="float32")))
            cpu_decode_layout(m)
        hf_target, hf_draft = hf_models
    ar = _Ours(SpecDecoder(target, spec=SpecConfig(method="none"), eos_token_ids=()),
               max_new_tokens)
    sd = _Ours(SpecDecoder(target, draft, SpecConfig(method="draft", k=k), eos_token_ids=()),
               max_new_tokens)
    hf = _HF(hf_target, hf_draft, k, max_new_tokens)
    out: dict = {"prompts": len(prompts), "prompt_tokens": sorted({len(p) for p in prompts}),
                 "max_new_tokens": max_new_tokens, "k": k, "batches": batches,
                 "torch_threads": torch_threads, "torch_version": torch.__version__,
                 "transformers_version": transformers.__version__,
                 "cpus": os.cpu_count(), "load_avg_1m": [_load_avg()],
                 "rows": [], "mismatches": [],
                 "notes": ["HF assisted generation is batch-1 only in transformers: at "
                           "batch > 1 ours SD is set against HF greedy"]}
    if torch_threads >= (os.cpu_count() or 1):
        out["notes"].append(BUSY_HOST_NOTE)
    acc = {"ours_accepted": 0, "ours_iterations": 0, "hf_tokens": 0, "hf_calls": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        with torch.inference_mode():
            for b in batches:
                out["rows"].append(_run_batch(b, prompts, hf, ar, sd, acc, out["mismatches"]))
    finally:
        torch.set_num_threads(threads)
    out["load_avg_1m"].append(_load_avg())

    for row in out["rows"]:
        b = row["batch"]
        for m in METHODS:
            if m in row["tok_s"]:
                out[f"{m}_tok_s_batch{b}"] = row["tok_s"][m]
        if b == 1:
            out["ar_speedup_vs_hf"] = row["ar_speedup"]
            out["sd_speedup_vs_hf"] = row["sd_speedup"]
            out["tokens_equal"] = row["rows_equal"] == row["rows"]
        else:
            out[f"batch{b}_ar_speedup_vs_hf"] = row["ar_speedup"]
            out[f"batch{b}_sd_speedup_vs_hf_greedy"] = row["sd_speedup"]
            out[f"tokens_equal_batch{b}"] = row["rows_equal"] == row["rows"]
            out[f"rows_equal_fraction_batch{b}"] = row["rows_equal"] / row["rows"]
    out["ours_sd_mean_acceptance_length"] = 1.0 + acc["ours_accepted"] / max(
        acc["ours_iterations"], 1)
    out["hf_assisted_mean_acceptance_length"] = acc["hf_tokens"] / max(acc["hf_calls"], 1)
    return out


def _run_batch(b: int, prompts: list[list[int]], hf: _HF, ar: _Ours, sd: _Ours,
               acc: dict, mismatches: list) -> dict:
    """Warms up, then times every method on each group of ``b`` prompts, interleaved."""
    run = {"hf_greedy": hf.greedy, "hf_assisted": hf.assisted, "ours_ar": ar, "ours_sd": sd}
    methods = [m for m in METHODS if b == 1 or m != "hf_assisted"]
    groups = [list(range(i, i + b)) for i in range(0, len(prompts) - b + 1, b)]
    for m in methods:  # compiles ours; torch's first-call overheads
        run[m]([prompts[i] for i in groups[0]])
    rates: dict[str, list[float]] = {m: [] for m in methods}
    rows_equal = 0
    for g in groups:
        ps = [prompts[i] for i in g]
        toks = {}
        for m in methods:
            calls0 = hf.calls
            t0 = time.perf_counter()
            toks[m] = run[m](ps)
            rates[m].append(sum(len(t) for t in toks[m]) / (time.perf_counter() - t0))
            if m == "hf_assisted":
                acc["hf_tokens"] += sum(len(t) for t in toks[m])
                acc["hf_calls"] += hf.calls - calls0
        acc["ours_accepted"] += sum(r.stats["accepted"] for r in sd.last)
        acc["ours_iterations"] += sum(r.stats["iterations"] for r in sd.last)
        for j, i in enumerate(g):
            ref, ok = toks["hf_greedy"][j], True
            for m in methods:
                got = toks[m][j]
                if len(got) != sd.max_new or got != ref:
                    ok = False
                    mismatches.append({"batch": b, "prompt": i, "method": m,
                                       "first_diff": _first_diff(got, ref), "len": len(got)})
            rows_equal += ok
    tok_s = {m: statistics.median(r) for m, r in rates.items()}
    sd_ref = "hf_assisted" if b == 1 else "hf_greedy"
    return {"batch": b, "calls": len(groups), "rows": len(groups) * b,
            "rows_equal": rows_equal, "tok_s": tok_s,
            "ar_speedup": tok_s["ours_ar"] / tok_s["hf_greedy"],
            "sd_speedup": tok_s["ours_sd"] / tok_s[sd_ref], "sd_speedup_vs": sd_ref}


def format_table(res: dict) -> str:
    """``compare_hf``'s result as a small text table (one line per batch size)."""
    head = (f"{'batch':>5} {'HF greedy':>10} {'HF assisted':>11} {'ours AR':>9} "
            f"{'ours SD':>9} {'AR/HF':>6} {'SD/HF':>6} {'tokens equal':>12}")
    lines = [head]
    for r in res["rows"]:
        t = r["tok_s"]
        assisted = f"{t['hf_assisted']:>11.1f}" if "hf_assisted" in t else f"{'n/a':>11}"
        lines.append(f"{r['batch']:>5} {t['hf_greedy']:>10.1f} {assisted} "
                     f"{t['ours_ar']:>9.1f} {t['ours_sd']:>9.1f} {r['ar_speedup']:>6.2f} "
                     f"{r['sd_speedup']:>6.2f} {str(r['rows_equal']) + '/' + str(r['rows']):>12}")
    lines += ["# tokens/s: median over calls (one call = one group of `batch` prompts, "
              "prefill included); AR/HF: ours AR / HF greedy;",
              "# SD/HF: ours SD / HF assisted at batch 1, / HF greedy at batch > 1 "
              "(transformers' assisted generation is batch-1 only);",
              "# tokens equal: rows where every method's tokens equal HF greedy's.",
              f"# mean acceptance length: ours SD {res['ours_sd_mean_acceptance_length']:.2f}, "
              f"HF assisted {res['hf_assisted_mean_acceptance_length']:.2f} "
              "(tokens per target forward)"]
    lines += [f"# note: {n}" for n in res["notes"][1:]]
    lines += [f"# mismatch: batch {m['batch']} prompt {m['prompt']} {m['method']} first "
              f"differs at token {m['first_diff']} ({m['len']} tokens)"
              for m in res["mismatches"]]
    return "\n".join(lines)
