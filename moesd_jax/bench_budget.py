"""Expert-budget sweep (``scripts/bench.py budget``): B against experts loaded, bytes,
acceptance, agreement and speed, for draft trees.

For each tree and each (policy, B) point, one decoder (``SpecConfig.budget``) generates
greedily for the prompt set; the unbudgeted decoder with the same drafter is the
reference (its greedy output is the target's). Per point:

  unique_experts      distinct experts per MoE layer per verification forward (batch-wide,
                      mean over layers and steps), from the loop's statistics
  natural_unique      the same tokens' natural routing (what an unbudgeted forward loads)
  expert_mb_per_verify  unique_experts x MoE layers x one expert's bytes
  acceptance_length   token-weighted 1 + accepted / iterations
  agreement           token match rate with the unbudgeted greedy output
                      (``spec.budget.agreement``; lossless must give 1.0)
  tokens_per_s        median over ``repeats`` whole generate calls after a warm-up
  mass_kept           routing mass on loaded experts / total (budgeted points)

Two workloads: the bundled pair (trained target and draft, held-out code prompts) and
the memory-bound shape of ``bench.py decode`` (``bench_decode.bench_configs``: random
weights, random prompts, the oracle drafter filling the tree at a given acceptance).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from moesd_jax.config import BudgetConfig, SpecConfig
from moesd_jax.spec import budget as spec_budget


def _points(policies: Sequence[str], budgets: Sequence[int], num_experts: int,
            top_k: int, mass: float) -> list[BudgetConfig]:
    pts = [BudgetConfig()]
    for p in policies:
        for b in budgets:
            if not top_k <= b <= num_experts:
                raise ValueError(f"--budgets {b} must be in [top_k={top_k}, E={num_experts}]")
            pts.append(BudgetConfig(policy=p, b=b, mass=mass))
    return pts


def _unique_per_verify(dec, prompts, max_new, ref_rows) -> float:
    """Batch-wide distinct experts per MoE layer per verify forward of one greedy run
    (the same compiled program as ``generate``; untimed)."""
    prepared = dec.prepare_host(prompts, max_new)
    if ref_rows is not None:
        m = max(len(r) for r in ref_rows)
        ref = np.zeros((len(prompts), m), np.int32)
        for i, r in enumerate(ref_rows):
            ref[i, :len(r)] = r
        prepared = prepared + (ref,)
    cfg = dec.loop_config([len(p) for p in prompts], [max_new] * len(prompts))
    st = jax.device_get(dec.generate_state(*prepared, cfg=cfg).stats)
    n, uniq = int(st.verify_steps), np.asarray(st.unique_experts_L, np.float64)
    return float(uniq.mean() / n) if n and len(uniq) else 0.0


def budget_sweep(target, draft, spec: SpecConfig, prompts: list[list[int]], *,
                 budgets: Sequence[int], policies: Sequence[str] = ("lossless", "moe_spec"),
                 mass: float = 0.9, max_new: int = 64, repeats: int = 3, batch: int = 1,
                 oracle_reference: list[list[int]] | None = None,
                 progress: Callable[[dict], None] | None = None,
                 decoder_kwargs: dict | None = None) -> list[dict]:
    """The sweep for one drafter/tree ``spec`` (its ``budget`` is replaced per point),
    ``prompts`` decoded in batches of ``batch`` rows.

    Returns:
      one dict per point (``policy`` ``none`` first): policy, b, unique_experts,
      natural_unique, expert_mb_per_verify, acceptance_length, agreement, tokens_per_s,
      speedup (over ``none``), mass_kept, nodes_pruned, equal_to_unbudgeted.
    """
    from moesd_jax.spec.decoder import SpecDecoder

    m = target.cfg.moe
    n_moe = sum(int(layer.is_moe) for layer in target.layers)
    itemsize = np.dtype(target.cfg.param_dtype).itemsize
    expert_bytes = 3 * target.cfg.d_model * m.expert_dim * itemsize
    chunks = [slice(i, i + batch) for i in range(0, len(prompts), batch)]

    def run(dec):
        res = []
        for c in chunks:
            kw = ({} if oracle_reference is None
                  else dict(oracle_reference=oracle_reference[c]))
            res += dec.generate(prompts[c], max_new, **kw)
        return res

    rows, ref_tokens, base_rate = [], None, None
    for bc in _points(policies, budgets, m.num_experts, m.top_k, mass):
        dec = SpecDecoder(target, draft, dataclasses.replace(spec, budget=bc),
                          **(decoder_kwargs or {}))
        res = run(dec)  # compile + the outputs
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = run(dec)
            rates.append(sum(len(r.token_ids) for r in res) / (time.perf_counter() - t0))
        toks = [r.token_ids for r in res]
        if ref_tokens is None:
            ref_tokens = toks
        rate = statistics.median(rates)
        base_rate = base_rate or rate
        uniq = float(np.mean([_unique_per_verify(
            dec, prompts[c], max_new, None if oracle_reference is None
            else oracle_reference[c]) for c in chunks]))
        bsts = [r.stats["budget"] for r in res if "budget" in r.stats]
        acc = sum(r.stats["accepted"] for r in res)
        its = sum(r.stats["iterations"] for r in res)
        row = {"policy": bc.policy, "b": bc.b if bc.b is not None else m.num_experts,
               "unique_experts": uniq,
               "natural_unique": (float(np.mean([b["natural_unique_experts"] for b in bsts]))
                                  if bsts else uniq),
               "expert_mb_per_verify": uniq * n_moe * expert_bytes / 1e6,
               "acceptance_length": 1 + acc / max(its, 1),
               "agreement": spec_budget.agreement(toks, ref_tokens),
               "tokens_per_s": rate, "speedup": rate / base_rate,
               "mass_kept": float(np.mean([b["mass_kept"] for b in bsts])) if bsts else 1.0,
               "nodes_pruned": sum(r.stats.get("budget", {}).get("nodes_pruned", 0)
                                   for r in res),
               "equal_to_unbudgeted": toks == ref_tokens}
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def bench_shape_workload(small: bool, prompts: int, prompt_len: int, max_new: int,
                         depth: int, seed: int = 0):
    """(target, prompts, oracle reference rows) on the memory-bound shape of ``bench.py
    decode`` (``small``: the tiny shape of its ``--small``): random weights in the CPU
    decode layout, random prompts, references = prompt + the target's greedy output."""
    from flax import nnx

    from moesd_jax import bench_decode as bd
    from moesd_jax.models.transformer import Transformer
    from moesd_jax.runtime import cpu_decode_layout
    from moesd_jax.spec.decoder import SpecDecoder

    cfgs = (bd.bench_configs(d_model=64, layers=2, experts=8, top_k=2, expert_dim=64,
                             vocab=512) if small else bd.bench_configs())
    cfg = cfgs["moe"]
    model = Transformer(cfg, nnx.Rngs(seed))
    cpu_decode_layout(model)
    rng = np.random.default_rng(seed)
    ps = rng.integers(1, cfg.vocab_size, (prompts, prompt_len)).tolist()
    ar = SpecDecoder(model, spec=SpecConfig(method="none"))
    ref = [p + r.token_ids for p, r in zip(ps, ar.generate(ps, max_new + depth + 1))]
    return model, ps, ref
