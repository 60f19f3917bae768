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

from moesd_jax import sharding
from moesd_jax.config import ModelConfig
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


def dispatch_gather(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK,
                    max_active=None):
    """Reads only the active experts' weights: one loop step per active-expert slot.

    Slots past the distinct active experts (id E) skip their compute via ``lax.cond``, so
    time grows with the number of experts the step really routes to.
    """
    e = w_gate_EDF.shape[0]
    dt = x_TD.dtype
    active_A = active_experts(ids_TK, e, max_active)

    def body(y_TD, expert):
        def run(y):
            wg = jax.lax.dynamic_index_in_dim(w_gate_EDF, expert, keepdims=False).astype(dt)
            wu = jax.lax.dynamic_index_in_dim(w_up_EDF, expert, keepdims=False).astype(dt)
            wd = jax.lax.dynamic_index_in_dim(w_down_EFD, expert, keepdims=False).astype(dt)
            gate_T = jnp.sum(jnp.where(ids_TK == expert, combine_TK, 0.0), axis=1)
            return y + gate_T.astype(jnp.float32)[:, None] * _swiglu(x_TD, wg, wu, wd).astype(
                jnp.float32)

        return jax.lax.cond(expert < e, run, lambda y: y, y_TD), None

    y0 = jnp.zeros(x_TD.shape, jnp.float32)
    y, _ = jax.lax.scan(body, y0, active_A)
    return y.astype(dt)


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

    def apply_budget(self, probs_TE, ids_TK, w_TK, token_valid_T, root_T, kernel: bool):
        """Verification-time expert budget (DESIGN.md "Expert budgeting").

        Draft tokens (valid, non-root) are routed by ``budgeted_dispatch`` under budget B
        (``MoEConfig.budget_policy``); root tokens keep their natural routing. Under
        ``prune`` a draft token that loses an expert gets all its assignments dropped
        (id E): the routing trace shows it, and the spec loop cuts acceptance there.
        """
        from moesd_jax.pallas.budgeted_dispatch import budgeted_dispatch

        m = self.cfg.moe
        t = probs_TE.shape[0]
        valid = jnp.ones((t,), jnp.bool_) if token_valid_T is None else token_valid_T
        root = jnp.zeros((t,), jnp.bool_) if root_T is None else root_T
        plan = budgeted_dispatch(probs_TE, top_k=m.top_k, budget=m.budget,
                                 policy=m.budget_policy, norm_topk_prob=m.norm_topk_prob,
                                 token_valid_T=valid & ~root,
                                 backend=None if kernel else "xla")
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
                 root_T=None):
        """Returns (y_TD, ids_TK) for T tokens (batch rows flattened into T).

        ``root_T`` marks each row's root (pending) token for budgeted dispatch: roots keep
        their natural experts outside the budget, so every verification step commits at
        least one token.
        """
        m = self.cfg.moe
        name = dispatch or m.dispatch
        with jax.named_scope("moe_route"):
            probs, ids, w = self.route(x_TD, token_valid_T)
        if name.endswith("_budgeted"):
            name = name.removesuffix("_budgeted")
            with jax.named_scope("moe_budget"):
                ids, w = self.apply_budget(probs, ids, w, token_valid_T, root_T,
                                           kernel=name == "pallas")
        with jax.named_scope("moe_dispatch"):
            # expert-parallel shard_map around the backend when a plan shards experts
            fn = sharding.maybe_expert_parallel(DISPATCH[name])
            y = fn(x_TD, self.w_gate_EDF[...], self.w_up_EDF[...], self.w_down_EFD[...],
                   ids, w, m.max_active)
        if m.shared_expert_dim:
            with jax.named_scope("moe_shared"):
                s = self.shared(x_TD)
                if m.shared_expert_gate:
                    gate = jax.nn.sigmoid(x_TD @ self.shared_gate_D1[...].astype(x_TD.dtype))
                    s = gate * s
                y = y + s
        return y, ids
