"""``bench.py utility``: utility-driven K (``--k auto``) against plain decoding and every
static K, on workloads where speculation wins, loses, and both.

Workloads (bundled pair, draft model): ``code`` (held-out code prompts: high
acceptance), ``shuffled`` (the same prompts' tokens randomly permuted: near-zero
acceptance), ``mix`` (alternating rows of both in every batch). On the memory-bound
benchmark shape (``bench_decode.bench_configs``, random weights) the oracle drafter at
acceptance 0.8 and 0.2 stands in for the two regimes.

Each (workload, config) decodes every prompt greedily in batches of ``batch``; the first
batch of each decoder is a warm-up (compilation, and auto's cost measurement) and is
timed like the others only after it; tokens/s is the median over batches; every config
must reproduce plain decoding's tokens. The criteria of the utility issue: auto >= 0.95x
AR on every workload and >= 0.95x the best static configuration.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

STATIC = ("none", "k:1", "k:2", "k:4")


def workloads(prompts: list[list[int]], seed: int = 0) -> dict[str, list[list[int]]]:
    """``code``, ``shuffled`` (each prompt's tokens permuted), ``mix`` (alternating)."""
    rng = np.random.default_rng(seed)
    shuf = [[int(t) for t in rng.permutation(p)] for p in prompts]
    mix = [p if i % 2 == 0 else s for i, (p, s) in enumerate(zip(prompts, shuf))]
    return {"code": prompts, "shuffled": shuf, "mix": mix}


def _decoder(target, draft, method: str, config: str, k_max: int, oracle_acceptance: float,
             max_len):
    from moesd_jax.config import SpecConfig
    from moesd_jax.spec.decoder import SpecDecoder

    if config == "none":
        return SpecDecoder(target, spec=SpecConfig(method="none"), max_len=max_len)
    extra = {"oracle_acceptance": oracle_acceptance} if method == "oracle" else {}
    d = draft if method == "draft" else None
    if config == "auto":
        spec = SpecConfig(method=method, k=k_max, auto=True, **extra)
    else:
        spec = SpecConfig(method=method, k=int(config.split(":")[1]), **extra)
    return SpecDecoder(target, d, spec, max_len=max_len)


def utility_sweep(target, draft, method: str, loads: dict[str, list[list[int]]],
                  configs=STATIC + ("auto",), max_new: int = 64, batch: int = 10,
                  oracle_acceptance: float = 0.8, max_len: int | None = None,
                  progress=None) -> list[dict]:
    """One dict per (workload, config): tokens/s, speedup vs AR, acceptance length,
    equality with AR, and for ``auto`` its decisions (share of K = 0, mean K)."""
    k_max = max(int(c.split(":")[1]) for c in configs if c.startswith("k:"))
    rows = []
    for wname, prompts in loads.items():
        batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        ar_tokens, ar_rate, wrows = None, None, []
        ref: dict[int, list] = {}  # AR outputs per batch: the oracle's reference
        for c in ["none"] + [c for c in configs if c != "none"]:
            dec = _decoder(target, draft, method, c, k_max, oracle_acceptance, max_len)

            def gen(bt, dec=dec, c=c, ref=ref):
                kw = {}
                if method == "oracle" and c != "none":
                    kw["oracle_reference"] = [p + t for p, t in zip(bt, ref[id(bt)])]
                return dec.generate(bt, max_new, **kw)

            gen(batches[0])  # warm-up: compile (and auto's cost measurement)
            toks, rates, acc, its, dec_ks = [], [], 0, 0, []
            for bt in batches:
                t0 = time.perf_counter()
                res = gen(bt)
                dt = time.perf_counter() - t0
                if c == "none":
                    ref[id(bt)] = [r.token_ids for r in res]
                rates.append(sum(len(r.token_ids) for r in res) / dt)
                toks += [r.token_ids for r in res]
                acc += sum(r.stats["accepted"] for r in res)
                its += sum(r.stats["iterations"] for r in res)
                dec_ks += [d["k"] for r in res for d in r.stats.get("utility", [])]
            rate = statistics.median(rates)
            if c == "none":
                ar_tokens, ar_rate = toks, rate
            row = {"workload": wname, "config": c, "tokens_per_s": rate,
                   "speedup": rate / ar_rate, "mean_acceptance_length": 1 + acc / max(its, 1),
                   "equal_to_ar": toks == ar_tokens}
            if c == "auto":
                row |= {"auto_costs": [round(float(x), 3) for x in dec.utility_costs(
                            min(batch, len(batches[0])))],
                        "auto_decisions": len(dec_ks),
                        "auto_k0_share": float(np.mean([k == 0 for k in dec_ks]))
                        if dec_ks else float("nan"),
                        "auto_mean_k": float(np.mean(dec_ks)) if dec_ks else float("nan")}
            wrows.append(row)
            if progress is not None:
                progress(row)
        best = max(r["tokens_per_s"] for r in wrows if r["config"] != "auto")
        for r in wrows:
            r["vs_best_static"] = r["tokens_per_s"] / best
        rows += wrows
    return rows
