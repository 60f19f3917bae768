"""``bench.py utility``: utility-driven K (``--k auto``) against plain decoding and every
static K, on workloads where speculation wins, loses, and both.

Workloads (bundled pair, draft model): ``code`` (held-out code prompts: high
acceptance), ``shuffled`` (the same prompts' tokens randomly permuted: near-zero
acceptance), ``mix`` (alternating rows of both in every batch). On the memory-bound
benchmark shape (``bench_decode.bench_configs``, random weights) the oracle drafter at
acceptance 0.8 and 0.2 stands in for the two regimes.

Each (workload, config) decodes every prompt greedily in batches of ``batch``; the
configs run interleaved batch by batch (``benchmarks.time_interleaved``) after a warm-up
batch each (compilation, and auto's cost measurement); tokens/s is the median over
batches and every ratio the median of per-batch paired ratios; every config must
reproduce plain decoding's tokens. The criteria of the utility issue: auto >= 0.95x
AR on every workload and >= 0.95x the best static configuration.
"""

from __future__ import annotations

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
    from moesd_jax.benchmarks import time_interleaved

    k_max = max(int(c.split(":")[1]) for c in configs if c.startswith("k:"))
    order = ["none"] + [c for c in configs if c != "none"]
    rows = []
    for wname, prompts in loads.items():
        batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        decs = {c: _decoder(target, draft, method, c, k_max, oracle_acceptance, max_len)
                for c in order}
        ref = {}  # AR outputs per batch: the oracle's reference
        if method == "oracle":
            for bt in batches:
                ref[id(bt)] = [r.token_ids for r in decs["none"].generate(bt, max_new)]

        seeds = {id(bt): i for i, bt in enumerate(batches)}

        def gen(dec, bt, ref=ref, seeds=seeds):
            # each batch its own seed (the same for every config): the oracle's accept
            # draws are per-row streams, and one seed for every call would repeat the same
            # draws at the same iterations of every call, which the controller's tests
            # (iterations 0-1, then every set phase) would then see each time
            kw = {"seed": seeds[id(bt)]}
            if method == "oracle" and dec.spec.method != "none":
                kw["oracle_reference"] = [p + t for p, t in zip(bt, ref[id(bt)])]
            return dec.generate(bt, max_new, **kw)

        if "auto" in decs:  # its plain twin too: calls the gate sends to plain run it
            decs["auto"].warm_up(batches[0], max_new)
        runs = time_interleaved(decs, batches, gen)
        ar = runs["none"]
        wrows = []
        for c in order:
            r = runs[c]
            row = {"workload": wname, "config": c, "tokens_per_s": r.rate,
                   "speedup": r.speedup_over(ar),
                   "mean_acceptance_length": r.acceptance_length,
                   "equal_to_ar": r.tokens == ar.tokens}
            if c == "auto":
                dec_ks = [d["k"] for res in r.results for x in res
                          for d in x.stats.get("utility", [])]
                row |= {"auto_costs": [round(float(x), 3) for x in decs[c].utility_costs(
                            min(batch, len(batches[0])))],
                        "auto_decisions": len(dec_ks),
                        "auto_k0_share": float(np.mean([k == 0 for k in dec_ks]))
                        if dec_ks else float("nan"),
                        "auto_mean_k": float(np.mean(dec_ks)) if dec_ks else float("nan")}
            wrows.append(row)
            if progress is not None:
                progress(row)
        # vs the best static config: paired per-batch ratios, as the speedups
        statics = [c for c in order if c != "auto"]
        for row in wrows:
            row["vs_best_static"] = min(runs[row["config"]].speedup_over(runs[c])
                                        for c in statics)
        rows += wrows
    return rows
