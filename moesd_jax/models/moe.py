"""Mixture-of-Experts block: softmax top-k router, dispatch backends, shared expert.

Routing convention (shared with ``moesd_jax.pallas``): ``ids_TK`` int32 expert ids where
an id equal to E means "dropped" (padding tokens, masked draft tokens, budget-pruned
assignments), and ``combine_TK`` float32 weights (0 where dropped).

Dispatch backends (``MoEConfig.dispatch``), all computing
``y[t] = sum_k combine[t, k] * FFN_{ids[t, k]}(x[t])``:
  dense   every expert on every token, masked by the gates (float32 reference);
  gather  only the distinct active experts' weights are read: a loop over at most A
          active-expert slots, each slot reading one expert's weights (CPU default);
  ragged  ``lax.ragged_dot`` over assignments sorted by expert (TPU/GPU XLA path);
  pallas  the expert-gather kernel in ``moesd_jax.pallas`` (only active experts' DMAs).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moesd_jax.config import ModelConfig
from moesd_jax.models.ep import expert_parallel
from moesd_jax.models.layers import MLP, param


def _swiglu(x_TD, wg_DF, wu_DF, wd_FD):
    return (jax.nn.silu(x_TD @ wg_DF) * (x_TD @ wu_DF)) @ wd_FD


def dispatch_dense(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK,
                   max_active=None):
    """Reference: every expert on every token in float32, weighted by dense gates."""
    del max_active
    e = w_gate_EDF.shape[0]
    x = x_TD.astype(jnp.float32)
    g = jnp.einsum("TD,EDF->TEF", x, w_gate_EDF.astype(jnp.float32))
    u = jnp.einsum("TD,EDF->TEF", x, w_up_EDF.astype(jnp.float32))
    y_TED = jnp.einsum("TEF,EFD->TED", jax.nn.silu(g) * u, w_down_EFD.astype(jnp.float32))
    onehot_TKE = jax.nn.one_hot(ids_TK, e, dtype=jnp.float32)  # id == E -> all zeros
    gates_TE = jnp.einsum("TKE,TK->TE", onehot_TKE, combine_TK.astype(jnp.float32))
    return jnp.einsum("TED,TE->TD", y_TED, gates_TE).astype(x_TD.dtype)


def active_experts(ids_TK: jax.Array, num_experts: int, max_active: int | None) -> jax.Array:
    """Distinct routed expert ids, padded with E: int32 [A], A = min(E, T*K) by default."""
    t, k = ids_TK.shape
    a = max_active if max_active is not None else min(num_experts, t * k)
    ids = jnp.where(ids_TK < num_experts, ids_TK, num_experts).reshape(-1)
    return jnp.unique(ids, size=a, fill_value=num_experts).astype(jnp.int32)


ExpertWeights = jax.Array | tuple  # stacked [E, ...] or a tuple of E per-expert arrays


def row_chunk(num_tokens: int, top_k: int, num_experts: int) -> int:
    """Rows per expert dot in ``gather``: about the expected rows per active expert.

    XLA:CPU runs a 1-row dot near memory bandwidth but multi-row dots slowly per byte, so
    few rows per expert go one or two at a time and many in chunks of up to 8 (measured:
    DESIGN.md "Step-cost facts", BENCHMARKS.md).
    """
    rows = -(-num_tokens * top_k // num_experts)
    return int(min(8, 1 << max(rows - 1, 0).bit_length()))


def _expert_ffn(w_gate, w_up, w_down, dt):
    """``f(expert, x_CD) -> y_CD`` for one expert chosen at run time.

    Stacked weights are indexed dynamically (portable; XLA copies the slice). A tuple of
    per-expert arrays is read through ``lax.switch`` with one branch per expert, so each
    dot takes its expert's weights as they are: on XLA:CPU even a static slice of a
    stacked array is copied before the dot (measured 1.36 ms vs 0.20 ms for one
    [1024, 1024] matvec), which is why CPU decoding unstacks (:func:`unstack_experts`).
    """
    if isinstance(w_gate, (tuple, list)):
        branches = [lambda x, i=i: _swiglu(x, w_gate[i].astype(dt), w_up[i].astype(dt),
                                           w_down[i].astype(dt))
                    for i in range(len(w_gate))]
        return lambda e, x: jax.lax.switch(e, branches, x)

    def stacked(e, x):
        take = lambda w: jax.lax.dynamic_index_in_dim(w, e, keepdims=False).astype(dt)  # noqa: E731
        return _swiglu(x, take(w_gate), take(w_up), take(w_down))

    return stacked


def dispatch_gather(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK,
                    max_active=None):
    """Reads only the active experts' weights, once each, and computes only routed rows.

    The T*K assignments are sorted by expert; a loop runs over the distinct active
    experts (a run-time trip count, at most A), and for each over its routed rows in
    chunks of ``row_chunk`` rows: gather the rows, one SwiGLU with that expert's weights,
    scale by the gates, write back into the sorted order; a final scatter-add sums each
    token's K contributions. Worked example, T=3, K=2, ids = [[5, 2], [2, 7], [5, 2]]:
    sorted assignments (expert:row) = 2:0 2:1 2:2 5:0 5:2 7:1, so expert 2 runs once on
    rows [0, 1, 2] (chunk 4, one padded row), 5 on [0, 2], 7 on [1]; nothing else is read.

    Weights are stacked ``[E, D, F]`` / ``[E, F, D]`` arrays or tuples of E per-expert
    arrays (see :func:`_expert_ffn`). Dropped assignments (id E) read nothing.
    """
    t, k = ids_TK.shape
    dt = x_TD.dtype
    e = len(w_gate_EDF) if isinstance(w_gate_EDF, (tuple, list)) else w_gate_EDF.shape[0]
    n = t * k
    c = row_chunk(t, k, e)
    ffn = _expert_ffn(w_gate_EDF, w_up_EDF, w_down_EFD, dt)
    flat_N = jnp.where(ids_TK < e, ids_TK, e).reshape(n)
    order_N = jnp.argsort(flat_N, stable=True)
    rows_N = (order_N // k).astype(jnp.int32)
    gate_N = combine_TK.reshape(n)[order_N].astype(jnp.float32)
    counts_E = jnp.bincount(flat_N, length=e + 1)[:e].astype(jnp.int32)
    starts_E = (jnp.cumsum(counts_E) - counts_E).astype(jnp.int32)
    active_A = active_experts(ids_TK, e, max_active)
    n_active = jnp.sum(active_A < e)
    pad = lambda v: jnp.concatenate([v, jnp.zeros((c,) + v.shape[1:], v.dtype)])  # noqa: E731
    xs_ND = pad(jnp.take(x_TD, rows_N, axis=0))
    gate_N = pad(gate_N)

    def per_expert(a, ys_ND):
        ex = active_A[a]
        cnt, st = counts_E[ex], starts_E[ex]

        def per_chunk(j, ys_ND):
            off = st + j * c
            x_CD = jax.lax.dynamic_slice_in_dim(xs_ND, off, c)
            g_C = jax.lax.dynamic_slice_in_dim(gate_N, off, c)
            g_C = jnp.where(jnp.arange(c) < cnt - j * c, g_C, 0.0)  # rows of the next expert
            y_CD = ffn(ex, x_CD).astype(jnp.float32) * g_C[:, None]
            return jax.lax.dynamic_update_slice_in_dim(ys_ND, y_CD, off, 0)

        return jax.lax.fori_loop(0, (cnt + c - 1) // c, per_chunk, ys_ND)

    # experts run in ascending order, so a chunk's padded rows (zeroed above) are
    # overwritten by the next expert's own chunks afterwards
    ys_ND = jax.lax.fori_loop(0, n_active, per_expert,
                              jnp.zeros((n + c, x_TD.shape[1]), jnp.float32))
    y_TD = jnp.zeros((t, x_TD.shape[1]), jnp.float32).at[rows_N].add(ys_ND[:n])
    return y_TD.astype(dt)


def unstack_experts(model) -> int:
    """Holds every MoE layer's expert weights as tuples of per-expert arrays (in place).

    The CPU decode layout for ``gather`` (see :func:`_expert_ffn`): each expert's
    matrices become separate buffers, the stacked arrays are dropped (weights stay
    resident once). Only for single-device use: sharding and the other dispatch backends
    need the stacked layout, which :func:`stack_experts` restores. Returns the number of
    layers changed.
    """
    changed = 0
    for block in _moe_blocks(model):
        for name in EXPERT_PARAMS:
            var = getattr(block, name)
            w = var.get_value()
            if not isinstance(w, tuple):
                var.set_value(tuple(w[i] for i in range(w.shape[0])))
                changed += 1
    return changed // len(EXPERT_PARAMS)


def stack_experts(model) -> int:
    """Inverse of :func:`unstack_experts` (in place); returns the number of layers changed."""
    changed = 0
    for block in _moe_blocks(model):
        for name in EXPERT_PARAMS:
            var = getattr(block, name)
            w = var.get_value()
            if isinstance(w, tuple):
                var.set_value(jnp.stack(w))
                changed += 1
    return changed // len(EXPERT_PARAMS)


EXPERT_PARAMS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


def _moe_blocks(model):
    return [layer.moe for layer in model.layers if layer.is_moe]


def dispatch_ragged(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK,
                    max_active=None):
    """``lax.ragged_dot`` over the T*K assignments sorted by expert (dropped ones last)."""
    del max_active
    t, k = ids_TK.shape
    e = w_gate_EDF.shape[0]
    dt = x_TD.dtype
    flat = jnp.where(ids_TK < e, ids_TK, e).reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = jnp.take(x_TD, order // k, axis=0)  # [T*K, D]
    sizes = jnp.bincount(flat, length=e + 1)[:e].astype(jnp.int32)
    gg = jax.lax.ragged_dot(xs, w_gate_EDF.astype(dt), sizes)
    uu = jax.lax.ragged_dot(xs, w_up_EDF.astype(dt), sizes)
    yy = jax.lax.ragged_dot(jax.nn.silu(gg) * uu, w_down_EFD.astype(dt), sizes)
    w = combine_TK.reshape(-1)[order]
    yy = jnp.where((flat[order] < e)[:, None], yy.astype(jnp.float32) * w[:, None], 0.0)
    y = jnp.zeros((t, x_TD.shape[1]), jnp.float32).at[order // k].add(yy)
    return y.astype(dt)


def dispatch_pallas(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK,
                    max_active=None):
    """The Pallas expert-gather kernel (interpret mode on CPU)."""
    from moesd_jax.pallas import ops

    return ops.expert_ffn(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK,
                          max_active=max_active)


DISPATCH: dict[str, Callable] = {
    "dense": dispatch_dense,
    "gather": dispatch_gather,
    "ragged": dispatch_ragged,
    "pallas": dispatch_pallas,
}


def route_topk(probs_TE: jax.Array, top_k: int, norm_topk_prob: bool):
    """Natural routing: (ids_TK int32, combine_TK float32) from router probabilities."""
    w, ids = jax.lax.top_k(probs_TE, top_k)
    if norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), w


class MoEBlock(nnx.Module):
    """Router + routed experts (+ optional shared expert with sigmoid gate)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        m = cfg.moe
        d, e, f, dt = cfg.d_model, m.num_experts, m.expert_dim, cfg.param_dtype
        self.cfg = cfg
        self.router_DE = param(rngs, (d, e), ("embed", "expert_router"), dt)
        self.w_gate_EDF = param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), dt)
        self.w_up_EDF = param(rngs, (e, d, f), ("expert", "embed", "expert_mlp"), dt)
        self.w_down_EFD = param(rngs, (e, f, d), ("expert", "expert_mlp", "embed"), dt)
        if m.shared_expert_dim:
            self.shared = MLP(d, m.shared_expert_dim, dt, rngs)
            if m.shared_expert_gate:
                self.shared_gate_D1 = param(rngs, (d, 1), ("embed", None), dt)

    def expert_weights(self, stacked: bool = True):
        """(w_gate, w_up, w_down) as held: stacked arrays, or per-expert tuples after
        :func:`unstack_experts` (re-stacked here for backends that need ``[E, ...]``)."""
        ws = tuple(getattr(self, n).get_value() for n in EXPERT_PARAMS)
        if stacked and isinstance(ws[0], tuple):
            ws = tuple(jnp.stack(w) for w in ws)
        return ws

    def apply_budget(self, probs_TE, ids_TK, w_TK, token_valid_T, root_T, kernel: bool,
                     priority_T=None):
        """Verification-time expert budget (DESIGN.md "Expert budgeting").

        Draft tokens (valid, non-root) are routed by ``budgeted_dispatch`` under budget B
        (``MoEConfig.budget_policy``, ``budget_mass``); root tokens keep their natural
        routing. Under ``prune`` a draft token that loses an expert gets all its
        assignments dropped (id E): the routing trace shows it, the transformer drops it
        and its descendants from later layers, and the spec loop cuts acceptance there.
        ``priority_T`` (the draft nodes' path log-probabilities) switches the selection
        from top-B by mass to path selection (the likeliest nodes' experts first).
        """
        from moesd_jax.pallas.budgeted_dispatch import budgeted_dispatch

        m = self.cfg.moe
        t = probs_TE.shape[0]
        valid = jnp.ones((t,), jnp.bool_) if token_valid_T is None else token_valid_T
        root = jnp.zeros((t,), jnp.bool_) if root_T is None else root_T
        plan = budgeted_dispatch(probs_TE, top_k=m.top_k, budget=m.budget,
                                 policy=m.budget_policy, norm_topk_prob=m.norm_topk_prob,
                                 token_valid_T=valid & ~root,
                                 backend=None if kernel else "xla",
                                 mass_fraction=m.budget_mass, priority_T=priority_T)
        keep_nat = (root & valid)[:, None]
        return (jnp.where(keep_nat, ids_TK, plan.ids_TK),
                jnp.where(keep_nat, w_TK, plan.combine_TK))

    def route(self, x_TD: jax.Array, token_valid_T=None):
        """Router probabilities [T, E] (float32) and natural (ids_TK, combine_TK)."""
        m = self.cfg.moe
        logits = x_TD.astype(jnp.float32) @ self.router_DE[...].astype(jnp.float32)
        probs_TE = jax.nn.softmax(logits, axis=-1)
        ids, w = route_topk(probs_TE, m.top_k, m.norm_topk_prob)
        if token_valid_T is not None:  # masked tokens load no expert
            ids = jnp.where(token_valid_T[:, None], ids, m.num_experts)
            w = jnp.where(token_valid_T[:, None], w, 0.0)
        return probs_TE, ids, w

    def __call__(self, x_TD: jax.Array, token_valid_T=None, dispatch: str | None = None,
                 root_T=None, plan=None, stats_valid_T=None, return_stats: bool = False,
                 priority_T=None):
        """Returns (y_TD, ids_TK) for T tokens (batch rows flattened into T).

        ``plan``: a ``sharding.ShardingPlan`` that shards experts runs the dispatch
        expert-parallel (``models/ep.py``); None = local.

        ``root_T`` marks each row's root (pending) token for budgeted dispatch: roots keep
        their natural experts outside the budget, so every verification step commits at
        least one token.

        ``return_stats``: also return budget statistics, float32 [3] over the tokens of
        ``stats_valid_T`` (default ``token_valid_T``; the transformer passes the tokens
        verified before any were pruned): (distinct experts of their natural top-k
        routing = what an unbudgeted forward loads, routing mass on the experts this
        forward loads, their total routing mass). Zeros without a budget.
        """
        m = self.cfg.moe
        name = dispatch or m.dispatch
        with jax.named_scope("moe_route"):
            probs, ids, w = self.route(x_TD, token_valid_T)
        stats = jnp.zeros((3,), jnp.float32)
        if name.endswith("_budgeted"):
            name = name.removesuffix("_budgeted")
            with jax.named_scope("moe_budget"):
                ids, w = self.apply_budget(probs, ids, w, token_valid_T, root_T,
                                           kernel=name == "pallas", priority_T=priority_T)
                if return_stats:
                    stats = self._budget_stats(probs, ids, stats_valid_T
                                               if stats_valid_T is not None else token_valid_T)
        with jax.named_scope("moe_dispatch"):
            # expert-parallel shard_map around the backend when the plan shards experts
            fn = expert_parallel(plan, DISPATCH[name])
            y = fn(x_TD, *self.expert_weights(stacked=name != "gather"), ids, w,
                   m.max_active)
        if m.shared_expert_dim:
            with jax.named_scope("moe_shared"):
                s = self.shared(x_TD)
                if m.shared_expert_gate:
                    gate = jax.nn.sigmoid(x_TD @ self.shared_gate_D1[...].astype(x_TD.dtype))
                    s = gate * s
                y = y + s
        if return_stats:
            return y, ids, stats
        return y, ids

    def _budget_stats(self, probs_TE, ids_TK, valid_T):
        """(natural distinct experts, mass on loaded experts, total mass) over valid_T."""
        m = self.cfg.moe
        e = m.num_experts
        t = probs_TE.shape[0]
        valid_T = jnp.ones((t,), jnp.bool_) if valid_T is None else valid_T
        nat_TK, _ = route_topk(probs_TE, m.top_k, False)
        nat_TK = jnp.where(valid_T[:, None], nat_TK, e).reshape(-1)
        natural_E = jnp.zeros((e + 1,), jnp.bool_).at[nat_TK].set(True)[:e]
        loaded_E = jnp.zeros((e + 1,), jnp.bool_).at[ids_TK.reshape(-1)].set(True)[:e]
        p_TE = jnp.where(valid_T[:, None], probs_TE, 0.0)
        return jnp.stack([jnp.sum(natural_E).astype(jnp.float32),
                          jnp.sum(jnp.where(loaded_E[None, :], p_TE, 0.0)),
                          jnp.sum(p_TE)])
