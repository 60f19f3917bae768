"""Verification-time expert budgets (DESIGN.md "Expert budgeting"; MoE-Spec).

The user describes a budget with :class:`~moesd_jax.config.BudgetConfig`
(``SpecConfig.budget``, ``--budget POLICY --budget-b B``); this module maps it onto the
target's MoE config (one dispatch path: ``<backend>_budgeted`` in ``models/moe.py``, the
selection in ``pallas/budgeted_dispatch.py``), reads the loop's budget statistics and runs
the quality gate.

Policies -> ``MoEConfig`` fields:

===========  ================  ===============================  ==============
policy       budget_policy     selection                        lossless
===========  ================  ===============================  ==============
moe_spec     substitute        top-B by mass                    no
  truncate   truncate          top-B by mass                    no
mass         substitute        mass fraction f, capped at B     no
  truncate   truncate          mass fraction f, capped at B     no
lossless     prune             path: likeliest nodes, then mass yes
===========  ================  ===============================  ==============

``lossless`` gives the verify forward each draft node's path log-probability
(``loop.node_priority``) and ``budgeted_dispatch`` covers the experts of the longest
prefix of nodes in that order that fits in B (then fills by mass): the budget goes to the
path likely to be accepted rather than to the tree's bulk (top-B by mass over all nodes
cut the accepted path and lost 25-45% of the acceptance length, BENCHMARKS.md).

Only verification forwards are budgeted; prefill and plain decoding steps run the
unbudgeted backend (``LoopConfig.prefill_dispatch``). B is static: each B is its own
compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from moesd_jax.config import BudgetConfig, ConfigError, SpecConfig


def moe_fields(budget: BudgetConfig, moe, prefix: str = "spec.budget") -> dict:
    """``MoEConfig`` fields that realise ``budget`` on a target whose MoE block is ``moe``.

    Returns {} for policy ``none``.

    Raises:
      ConfigError: a dense target, or B outside [top_k, num_experts].
    """
    budget.validate(prefix)
    if not budget.enabled:
        return {}
    if moe is None:
        raise ConfigError(f"{prefix}.policy={budget.policy!r}: the target is dense (no MoE "
                          "layers to budget)")
    b = budget.b if budget.b is not None else moe.num_experts
    if not moe.top_k <= b <= moe.num_experts:
        raise ConfigError(f"{prefix}.b={b} must be in [top_k={moe.top_k}, num_experts="
                          f"{moe.num_experts}] of the target")
    policy = {"lossless": "prune", "moe_spec": "substitute", "mass": "substitute"}[
        budget.policy]
    if budget.truncate:
        policy = "truncate"
    base = moe.dispatch.removesuffix("_budgeted")
    return {"dispatch": f"{base}_budgeted", "budget": b, "budget_policy": policy,
            "budget_mass": budget.mass if budget.policy == "mass" else None}


def budgeted_target(model, budget: BudgetConfig):
    """A view of ``model`` whose verification forwards run under ``budget``.

    The caller's model is not changed: the result is a new module object sharing its
    parameter arrays (no weight copy) with only its config replaced. Policy ``none``
    returns ``model`` itself (a target whose config already sets a budget keeps it).
    """
    from flax import nnx

    fields = moe_fields(budget, model.cfg.moe)
    if not fields:
        return model
    cfg = dataclasses.replace(model.cfg, moe=dataclasses.replace(model.cfg.moe, **fields))
    cfg.validate()
    view = nnx.merge(*nnx.split(model))
    view.cfg = cfg  # MoE blocks read cfg.moe at trace time
    for layer in view.layers:
        if layer.is_moe:
            layer.moe.cfg = cfg
    return view


def loop_stats(stats, rows: int | None = None) -> dict | None:
    """The ``"budget"`` entry of a result's stats from the loop's ``Stats`` (host arrays).

    Batch-wide numbers (the kept set is chosen over every row of a verification forward),
    per budgeted verification step: ``unique_experts_per_layer`` (loaded, per MoE layer)
    and ``natural_unique_experts_per_layer`` (the same tokens' natural routing: what the
    unbudgeted forward would load), their means over layers, ``mass_kept`` (fraction of
    the verified tokens' routing mass on loaded experts), ``steps``. ``nodes_pruned``: draft
    nodes of row ``rows`` (an int) pruned by a lossless budget. None when no step was
    budgeted.
    """
    n = int(stats.budget_steps)
    if n == 0:
        return None
    s_L4 = np.asarray(stats.budget_L4, np.float64)
    loaded, natural = s_L4[:, 0] / n, s_L4[:, 1] / n
    total = float(s_L4[:, 3].sum())
    out = {
        "steps": n,
        "unique_experts_per_layer": [round(float(x), 3) for x in loaded],
        "natural_unique_experts_per_layer": [round(float(x), 3) for x in natural],
        "unique_experts": float(loaded.mean()) if len(loaded) else 0.0,
        "natural_unique_experts": float(natural.mean()) if len(natural) else 0.0,
        "mass_kept": float(s_L4[:, 2].sum() / total) if total > 0 else 1.0,
    }
    if rows is not None:
        out["nodes_pruned"] = int(np.asarray(stats.nodes_pruned_B)[rows])
    return out


def agreement(tokens: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> float:
    """Token match rate: the fraction of reference positions (over all prompts) where
    ``tokens`` has the same token at the same position (missing = mismatch)."""
    match = total = 0
    for got, ref in zip(tokens, reference, strict=True):
        total += len(ref)
        match += sum(int(a == b) for a, b in zip(got, ref))
    return match / total if total else 1.0


def candidates(budget: BudgetConfig, num_experts: int) -> list[BudgetConfig]:
    """The fallback ladder of the quality gate: ``budget``, then B doubled up to E (each
    the same policy), then ``lossless`` at the first B (exact, always passes)."""
    out = [budget]
    b = budget.b if budget.b is not None else num_experts
    if budget.policy == "lossless":
        return out
    while b < num_experts:
        b = min(2 * b, num_experts)
        out.append(dataclasses.replace(budget, b=b))
    first = budget.b if budget.b is not None else num_experts
    out.append(BudgetConfig(policy="lossless", b=first))
    return out


@dataclasses.dataclass
class GateResult:
    """What :func:`calibrate` chose and measured (``tried``: (policy, B, agreement))."""

    budget: BudgetConfig
    agreement: float
    tried: list[tuple[str, int, float]]


def calibrate(target, draft, spec: SpecConfig, prompts: Sequence[Sequence[int]],
              max_new_tokens: int = 32, *, decoder_kwargs: dict | None = None) -> GateResult:
    """The quality gate: the first budget of :func:`candidates` whose greedy output agrees
    with the unbudgeted target's on ``prompts`` at least ``spec.budget.min_agreement``.

    Both runs are greedy speculative decoding with ``spec`` (the unbudgeted one is the
    target's exact greedy output, the reference). Lossy budgets are tried with B doubling
    up to E, then ``lossless`` at the requested B, which agrees exactly by construction
    (it is still measured). Each candidate compiles its own program.

    Returns:
      :class:`GateResult` with the chosen budget (``min_agreement`` kept) and the log.
    """
    from moesd_jax.spec.decoder import SpecDecoder

    bc = spec.budget
    if bc.min_agreement is None:
        raise ValueError("calibrate needs spec.budget.min_agreement")
    if not prompts:
        raise ValueError("calibrate needs at least one calibration prompt")
    kw = dict(decoder_kwargs or {})
    e = target.cfg.moe.num_experts if target.cfg.moe is not None else 0
    ref_spec = dataclasses.replace(spec, budget=BudgetConfig())
    ref = [r.token_ids for r in SpecDecoder(target, draft, ref_spec, **kw).generate(
        prompts, max_new_tokens)]
    tried, a = [], 0.0
    for cand in candidates(bc, e):
        dec = SpecDecoder(target, draft, dataclasses.replace(spec, budget=cand), **kw)
        got = [r.token_ids for r in dec.generate(prompts, max_new_tokens)]
        a = agreement(got, ref)
        tried.append((cand.policy, int(cand.b if cand.b is not None else e), a))
        if a >= bc.min_agreement:
            break
    # the last candidate (lossless) is taken even if a near-tie flipped a greedy token
    return GateResult(dataclasses.replace(cand, min_agreement=bc.min_agreement), a, tried)
