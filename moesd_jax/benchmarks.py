"""Benchmarks behind ``scripts/bench.py`` (kept importable; the script is a thin CLI).

Method (DESIGN.md): count bytes first, measure this machine's memory bandwidth in the same
run, time compiled functions after warm-up with ``block_until_ready``, report medians.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moesd_jax.models import moe


def median_time(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in seconds of ``fn()`` (blocked until ready)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def memcpy_bandwidth(nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """numpy copy bandwidth in bytes/s counting read + write (2 x nbytes per copy)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(ts)


def moe_layer(num_experts: int = 64, d: int = 1024, f: int = 1024, tokens: int = 16,
              top_k: int = 4, actives: list[int] | None = None, backend: str = "gather",
              repeats: int = 20, seed: int = 0) -> list[dict]:
    """Step time of one MoE layer's routed experts vs the number of active experts.

    Tokens are routed (top-k) among only ``n`` experts for each n in ``actives`` at a fixed
    token count, so the weights a step must read grow with n: the ``gather`` backend's
    time should grow with n, the ``dense`` backend's should not.

    Returns:
      one dict per n: active, ms, weight_bytes, gb_per_s (weight bytes / time).
    """
    e = num_experts
    if actives is None:
        actives = sorted({1, 2, 4, 8, 16, 32, e} & set(range(1, e + 1)))
    key = jax.random.split(jax.random.PRNGKey(seed), 4)
    w_gate = jax.random.normal(key[0], (e, d, f), jnp.float32) * 0.02
    w_up = jax.random.normal(key[1], (e, d, f), jnp.float32) * 0.02
    w_down = jax.random.normal(key[2], (e, f, d), jnp.float32) * 0.02
    x = jax.random.normal(key[3], (tokens, d), jnp.float32)
    fn = jax.jit(moe.DISPATCH[backend])
    rng = np.random.default_rng(seed)
    rows = []
    for n in actives:
        k = min(top_k, n)
        pool = rng.choice(e, n, replace=False)
        # every one of the n experts gets at least one token when tokens * k >= n
        flat = np.resize(rng.permutation(pool), tokens * k)
        ids = flat.reshape(tokens, k)
        for t in range(tokens):  # distinct experts per token
            if len(set(ids[t])) < k:
                ids[t] = rng.choice(pool, k, replace=False)
        n_used = len(np.unique(ids))
        ids_j = jnp.asarray(ids, jnp.int32)
        comb = jnp.full((tokens, k), 1.0 / k, jnp.float32)
        sec = median_time(functools.partial(fn, x, w_gate, w_up, w_down, ids_j, comb), repeats)
        wbytes = n_used * 3 * d * f * 4
        rows.append({"active": n_used, "ms": sec * 1e3, "weight_bytes": wbytes,
                     "gb_per_s": wbytes / sec / 1e9})
    return rows


def spec_sweep(target, draft, prompts: list[list[int]], configs: list[str], max_new: int = 64,
               batch: int = 10, max_len: int | None = None, eagle=None,
               keep_tokens: bool = False) -> list[dict]:
    """Greedy AR vs speculative decoding over ``prompts`` for each config, in one run.

    Each config is ``none``, ``chain:K``, ``ngram:K``, ``tree:NAME`` (draft model),
    ``ngram-tree:NAME`` (prompt lookup filling the tree), ``eagle:K`` or
    ``eagle-tree:NAME`` (the EAGLE-3 head ``eagle``). The configs run interleaved batch
    by batch (:func:`time_interleaved`) after a warm-up batch each (compilation). Every SD
    config is checked to reproduce the AR tokens exactly.

    Returns:
      one dict per config: config, mean_acceptance_length (token-weighted over prompts:
      1 + accepted / iterations), tokens_per_s (median over batches), speedup vs AR
      (median over batches of the paired per-batch ratios), equal_to_ar; with
      ``keep_tokens`` also token_ids (per prompt).
    """
    from moesd_jax.config import SpecConfig
    from moesd_jax.spec.decoder import SpecDecoder

    def make(c: str):
        if c == "none":
            return SpecDecoder(target, spec=SpecConfig(method="none"), max_len=max_len)
        kind, _, arg = c.partition(":")
        if kind == "chain":
            return SpecDecoder(target, draft, SpecConfig(method="draft", k=int(arg)),
                               max_len=max_len)
        if kind == "ngram":
            return SpecDecoder(target, spec=SpecConfig(method="ngram", k=int(arg)),
                               max_len=max_len)
        if kind == "tree":
            return SpecDecoder(target, draft, SpecConfig(method="draft", tree=arg),
                               max_len=max_len)
        if kind in ("eagle", "eagle-tree"):
            if eagle is None:
                raise ValueError(f"config {c!r} needs an EAGLE head (--eagle HEAD_DIR)")
            spec = (SpecConfig(method="eagle", k=int(arg)) if kind == "eagle"
                    else SpecConfig(method="eagle", tree=arg))
            return SpecDecoder(target, eagle, spec, max_len=max_len)
        if kind == "ngram-tree":
            return SpecDecoder(target, spec=SpecConfig(method="ngram", tree=arg),
                               max_len=max_len)
        raise ValueError(f"config {c!r} must be none, chain:K, ngram:K, tree:NAME, "
                         "ngram-tree:NAME, eagle:K or eagle-tree:NAME")

    batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    order = ["none"] + [c for c in configs if c != "none"]
    runs = time_interleaved({c: make(c) for c in order}, batches,
                            lambda dec, bt: dec.generate(bt, max_new))
    rows = []
    for c in order:
        r = runs[c]
        rows.append({"config": c, "mean_acceptance_length": r.acceptance_length,
                     "tokens_per_s": r.rate, "speedup": r.speedup_over(runs["none"]),
                     "equal_to_ar": r.tokens == runs["none"].tokens})
        if keep_tokens:
            rows[-1]["token_ids"] = r.tokens
    return rows


def spec_plan(config: str) -> tuple[int, int, str | None]:
    """``(verified tokens T, draft forwards per iteration, drafter)`` of one
    :func:`spec_sweep` config; drafter ``"draft"``, ``"eagle"`` or None (AR, prompt
    lookup: no weights). A tree drafts one forward per level."""
    from moesd_jax.spec.tree import load_tree

    if config == "none":
        return 1, 0, None
    kind, _, arg = config.partition(":")
    who = {"chain": "draft", "tree": "draft", "eagle": "eagle", "eagle-tree": "eagle"}.get(kind)
    if kind in ("chain", "ngram", "eagle"):
        return int(arg) + 1, int(arg), who
    tree = load_tree(arg)
    return len(tree.parents), int(tree.depths.max()), who


def traffic_bounds(target, draft, prompts: list[list[int]], rows: list[dict],
                   max_new: int = 64, eagle=None, bandwidth_bytes: int = 512 << 20) -> dict:
    """Batch 1: the speedup over AR that weight traffic alone allows each
    :func:`spec_sweep` row, and how close AR runs to the read bandwidth.

    An iteration verifying T tokens must read every weight of the target once plus each
    *unique* expert those T tokens route to (counted on this text: windows of T
    consecutive tokens of the prompts' own AR decoding, ``analysis.routing``), and each
    draft forward reads the drafter's weights once (the head's own parameters for EAGLE,
    nothing for prompt lookup). With the row's acceptance length ``L``::

        bound = L * bytes(T=1) / (bytes(T) + draft forwards * draft bytes)

    so a config whose ``bound`` is below 1 cannot beat AR on a machine where decoding is
    bandwidth-bound, however well its code runs. Bytes come from ``analysis.cost_model``
    (the KV cache read included) in the dtype the weights are resident in.

    Returns ``read_gb_per_s`` (measured now), ``ar_mb``, ``ar_gb_per_s`` (AR's rate x its
    bytes: whole generate calls, prefill included, so a lower bound),
    ``unique_experts`` per T and per config ``bound`` and ``iteration_mb``.
    """
    from moesd_jax.analysis import cost_model as cm
    from moesd_jax.analysis import routing
    from moesd_jax.config import SpecConfig
    from moesd_jax.models.transformer import param_bytes, resident_dtype
    from moesd_jax.spec.decoder import SpecDecoder

    cfg = target.cfg
    if cfg.moe is None:
        raise ValueError("traffic bounds need an MoE target (unique experts per T)")
    plans = {r["config"]: spec_plan(r["config"]) for r in rows}
    ts = sorted({t for t, _, _ in plans.values()} | {1})
    traces, _ = routing.record_traces(SpecDecoder(target, spec=SpecConfig(method="none")),
                                      prompts, max_new)
    tok = [routing.tokens_trace(tr) for tr in traces]
    uniq = {u["tokens"]: u["unique"] for u in routing.unique_vs_tokens(
        tok, cfg.moe.num_experts, cfg.moe.top_k, ts=ts, shuffles=1)}
    missing = [t for t in ts if t not in uniq]
    if missing:
        raise ValueError(f"--max-new-tokens={max_new} is too short for windows of {missing} "
                         "tokens")
    hw = cm.preset("h100")  # bytes only: they do not depend on the hardware
    ctx = max(len(p) for p in prompts) + max_new // 2

    def mb(t):
        return cm.step_cost(cfg, hw, 1, t, context=ctx, unique_experts=uniq[t],
                            weight_dtype=resident_dtype(target)).bytes / 1e6

    draft_mb = {}
    if draft is not None:
        draft_mb["draft"] = cm.step_cost(draft.cfg, hw, 1, 1, context=ctx,
                                         weight_dtype=resident_dtype(draft)).bytes / 1e6
    if eagle is not None:  # its own weights; the embedding row it reads is the target's
        draft_mb["eagle"] = param_bytes(eagle) / 1e6
    ar = mb(1)
    out = {"unique_experts": {int(t): float(uniq[t]) for t in ts}, "ar_mb": ar,
           "draft_mb": draft_mb, "configs": {}}
    for r in rows:
        t, d, who = plans[r["config"]]
        it = mb(t) + (d * draft_mb[who] if who else 0.0)
        out["configs"][r["config"]] = {"iteration_mb": it,
                                       "bound": r["mean_acceptance_length"] * ar / it}
    bw = cm.read_bandwidth(bandwidth_bytes)["peak"] / 1e9
    ar_rate = next((r["tokens_per_s"] for r in rows if r["config"] == "none"), None)
    out["read_gb_per_s"] = bw
    out["ar_gb_per_s"] = None if ar_rate is None else ar_rate * ar / 1e3
    return out


@dataclasses.dataclass
class Timed:
    """One config's runs over the same batches as the others (:func:`time_interleaved`)."""

    rates: list[float]  # generated tokens / s, per batch
    results: list[list]  # per batch, the GenerationResults

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def tokens(self) -> list[list[int]]:
        return [r.token_ids for res in self.results for r in res]

    @property
    def acceptance_length(self) -> float:
        """1 + accepted / iterations over every row (token-weighted)."""
        acc = sum(r.stats["accepted"] for res in self.results for r in res)
        its = sum(r.stats["iterations"] for res in self.results for r in res)
        return 1 + acc / max(its, 1)

    def speedup_over(self, base: Timed) -> float:
        """Median over batches of this config's rate / ``base``'s on the same batch: both
        ran back to back, so a slow spell of the machine hits both sides of each ratio."""
        return statistics.median(a / b for a, b in zip(self.rates, base.rates))


def time_interleaved(decoders: dict, batches: list, run) -> dict[str, Timed]:
    """Times ``run(decoder, batch)`` for every decoder on every batch, interleaved: batch by
    batch, each decoder in turn (the order rotating per batch), after one warm-up call
    per decoder (compilation). On a machine whose speed drifts, ratios of the same
    batch's rates (:meth:`Timed.speedup_over`) are far steadier than ratios of rates
    measured one config after another."""
    names = list(decoders)
    for n in names:
        run(decoders[n], batches[0])
    out = {n: Timed([], []) for n in names}
    for i, bt in enumerate(batches):
        for j in range(len(names)):
            n = names[(i + j) % len(names)]
            t0 = time.perf_counter()
            res = run(decoders[n], bt)
            dt = time.perf_counter() - t0
            out[n].rates.append(sum(len(r.token_ids) for r in res) / dt)
            out[n].results.append(res)
    return out


def batch_job_vs_spec(target, draft, prompts: list[list[int]], k: int = 4, max_new: int = 64,
                      batch: int = 10, tokenizer=None) -> dict:
    """The batch job's throughput next to :func:`spec_sweep`'s ``chain:K`` at one batch size.

    The job (``moesd_jax.batch``: JSONL input parsed, static batches of ``batch`` rows
    through one compiled program, result lines written and fsync-ed) decodes ``prompts``
    greedily with a chain of ``k`` draft tokens, after a warm-up job of one batch that
    compiles the program; its rate is generated tokens / wall time from the first batch's
    dispatch to the last line written (a mean over the job, where ``spec_sweep`` reports
    the median of per-batch rates). Both run in this process, one after the other.

    Returns:
      prompts, batch, k, job_tokens_per_s, job_seconds, job_mean_acceptance_length,
      spec_tokens_per_s, spec_mean_acceptance_length, ar_tokens_per_s, job_over_spec,
      tokens_equal (the job's tokens are the spec run's).
    """
    import json
    import tempfile
    from pathlib import Path

    from moesd_jax.batch import Defaults, Limits, ResultWriter, read_requests, run_job
    from moesd_jax.config import SpecConfig
    from moesd_jax.spec.decoder import SpecDecoder

    rows = spec_sweep(target, draft, prompts, [f"chain:{k}"], max_new, batch, keep_tokens=True)
    ar, sd = rows[0], rows[1]
    dec = SpecDecoder(target, draft, SpecConfig(method="draft", k=k))
    with tempfile.TemporaryDirectory(prefix="moesd_bench_batch_") as d:
        src = Path(d) / "in.jsonl"
        src.write_text("".join(json.dumps({"id": i, "prompt_ids": p, "max_tokens": max_new})
                               + "\n" for i, p in enumerate(prompts)))
        limits = Limits(vocab=dec.cfg.vocab, max_len=dec.cfg.max_len, k_eff=dec.cfg.k_eff)
        reqs, bad = read_requests(src, Defaults(max_tokens=max_new), limits, tokenizer)
        if bad:
            raise ValueError(f"prompt {bad[0]['line'] - 1}: {bad[0]['error']}")
        # warm-up: the first batch only (the job's shapes come from every request)
        run_job(dec, reqs, lambda lines: None, batch_size=batch,
                done={r.key for r in reqs[batch:]}, tokenizer=tokenizer, progress=False)
        writer = ResultWriter(Path(d) / "out.jsonl")
        try:
            job = run_job(dec, reqs, writer.write, batch_size=batch, tokenizer=tokenizer,
                          progress=False)
        finally:
            writer.close()
        out = {json.loads(x)["id"]: json.loads(x)["token_ids"]
               for x in (Path(d) / "out.jsonl").read_text().splitlines()}
    return {"prompts": len(prompts), "batch": batch, "k": k,
            "job_tokens_per_s": job["tokens_per_s"], "job_seconds": job["seconds"],
            "job_mean_acceptance_length": job["mean_acceptance_length"],
            "spec_tokens_per_s": sd["tokens_per_s"],
            "spec_mean_acceptance_length": sd["mean_acceptance_length"],
            "ar_tokens_per_s": ar["tokens_per_s"],
            "job_over_spec": job["tokens_per_s"] / sd["tokens_per_s"],
            "tokens_equal": [out[i] for i in range(len(prompts))] == sd["token_ids"]}
