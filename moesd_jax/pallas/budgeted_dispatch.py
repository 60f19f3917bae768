"""Token -> expert dispatch under a per-layer expert budget (kernel + jnp reference).

Legend: T tokens, E experts, K top-k, B budget, A kept-expert cap, N row tiles.

Expert selection (every policy). ``mass_E = sum over valid tokens of probs_TE``; the kept
set is ``the mass-selected experts  U  the natural top-k experts of every valid root
token``, capped at A slots. Mass selection (static ``mass_fraction``):

* None (MoE-Spec's top-B): the top-B experts by mass;
* f in (0, 1] (MoE-Spec's threshold mode): experts in mass order while the mass of the
  experts before them is below ``f * sum(mass_E)`` (so the expert that crosses the
  threshold is kept), at least the first K (tokens then still find K experts), at most B.

The cap A:

* without ``root_T``: A = min(E, B);
* with ``root_T``: A = min(E, B + K). With one root (the draft-tree root; vmap over
  sequences) the root always keeps its K experts and at most B + K are kept. If several
  roots are marked and the union would exceed A, experts are kept in priority order
  (root experts first, then by mass, ties to the lower id) and the lowest-priority ones
  are dropped, so a root can then lose an expert. That is the only lossy corner of
  ``prune``; mark one root per call to stay lossless.

``kept_A`` lists the kept experts in that priority order, padded with E.

Path selection (``priority_T`` given; XLA only, no kernel): instead of the top-B by mass,
the budget goes to the tokens most likely to be accepted. Valid non-root tokens are taken
in ``priority_T`` order (higher first, ties to the lower index) and their natural top-k
experts added while the union, not counting root experts, stays within B: the longest
such prefix of tokens is fully covered. Slots left over go to the remaining experts by
mass. Priority order for ``kept_A``: root experts, the prefix's experts, then by mass.
With a draft chain ordered root-first this keeps the longest verifiable prefix of the
chain; with a tree and path log-probabilities as priorities, the likeliest nodes.

Policies (how tokens are routed among the kept experts):

* ``substitute`` (MoE-Spec, lossy): each valid token takes its top-k among the kept
  experts; combine = the chosen experts' probs, renormalised over them iff
  ``norm_topk_prob``. If fewer than K experts are kept the missing picks are dropped.
  ``alive_T`` = token_valid_T.
* ``truncate`` (lossy): each valid token keeps only those of its natural top-k experts
  that are kept, with their natural probs renormalised over them iff
  ``norm_topk_prob`` (a token with no kept expert gets no routed output).
  ``alive_T`` = token_valid_T.
* ``prune`` (lossless): each token keeps its natural top-k and natural weights;
  ``alive_T[t]`` = valid and all of t's natural experts are kept. Assignments of
  non-alive tokens are dropped (id E, combine 0), so they load no expert. Pruning the
  descendants of a dead draft-tree node is the caller's job (it knows the tree).

Invalid tokens (``token_valid_T`` False) never count towards the mass and are always
dropped. Ties break towards the lower expert id everywhere (as ``lax.top_k`` does).

The Pallas kernel does the whole selection *and* the expert-sorted permutation
consumed by the expert-gather kernel (:class:`GatherLayout`: token -> row slot, tile ->
expert, used tiles) in one launch, with no sort and no cumsum (Mosaic lowers neither):
top-k is K rounds of max + first-argmax; expert ranks are pairwise comparisons on an
[E, E] tile; the token-order prefix count is a strictly-lower-triangular [T, T] matmul;
the tile prefix sums are masked [E, E] reductions. All index math runs in float32 (exact
below 2**24). Memory is O(T*T + E*E + T*E), so the kernel is meant for verification
widths (T <= ``MAX_KERNEL_TOKENS``); use ``backend="xla"`` beyond that. Inputs are padded
in XLA (TPU: T to 8, E to 128; GPU: every dim to a power of two, T and E to >= 16 for
``tl.dot``) and outputs sliced back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from moesd_jax.pallas import tuning
from moesd_jax.pallas.expert_gather import (
    GatherLayout,
    gather_layout,
    num_row_tiles,
    register_export_serialization,
)

POLICIES = ("prune", "substitute", "truncate")
MAX_KERNEL_TOKENS = 2048


@struct.dataclass
class BudgetPlan:
    """Result of budgeted dispatch for one layer.

    Attributes:
      kept_A: int32 [A] kept expert ids in priority order (root experts, then by mass),
        padded with E. A = ``max_active``.
      kept_E: bool [E] membership mask of the kept set.
      num_kept: int32 [] number of kept experts (<= A).
      ids_TK: int32 [T, K] routed expert ids, E = dropped.
      combine_TK: float32 [T, K] combine weights, 0 where dropped.
      alive_T: bool [T] tokens whose output is exact/usable (see module docstring).
      layout: :class:`GatherLayout` of ``ids_TK`` for the expert-gather kernel.
      max_active: static A, the active-expert cap to pass to ``expert_ffn``.
    """

    kept_A: jax.Array
    kept_E: jax.Array
    num_kept: jax.Array
    ids_TK: jax.Array
    combine_TK: jax.Array
    alive_T: jax.Array
    layout: GatherLayout
    max_active: int = struct.field(pytree_node=False)

    @property
    def kept_B(self) -> jax.Array:
        """Alias of ``kept_A`` (length B without roots, B + K with roots)."""
        return self.kept_A


register_export_serialization(BudgetPlan, "moesd_jax.pallas.BudgetPlan")


def kept_capacity(num_experts: int, top_k: int, budget: int, has_root: bool) -> int:
    """Static A: min(E, B) without roots, min(E, B + K) with roots."""
    return min(num_experts, budget + (top_k if has_root else 0))


# --------------------------------------------------------------------------- reference


def route_topk(probs_TE: jax.Array, top_k: int, norm_topk_prob: bool):
    """Natural routing without a budget.

    Args:
      probs_TE: [T, E] router probabilities.
      top_k: K.
      norm_topk_prob: renormalise the K weights to sum to 1.

    Returns:
      ids_TK int32 [T, K], combine_TK float32 [T, K].
    """
    w_TK, ids_TK = jax.lax.top_k(probs_TE.astype(jnp.float32), top_k)
    if norm_topk_prob:
        w_TK = w_TK / jnp.sum(w_TK, axis=-1, keepdims=True)
    return ids_TK.astype(jnp.int32), w_TK


def _select_experts_ref(probs_TE, valid_T, root_T, *, top_k, budget, max_active,
                        mass_fraction=None):
    """(kept_A int32 [A], kept_E bool [E]) by sorting and cumsums: independent of the
    kernel's pairwise ranks and masked sums."""
    t, e = probs_TE.shape
    mass_E = jnp.sum(jnp.where(valid_T[:, None], probs_TE, 0.0), axis=0)        # [E]
    nat_TK, _ = route_topk(probs_TE, top_k, False)
    root_TK = jnp.where((root_T & valid_T)[:, None], nat_TK, e)                 # [T, K]
    root_E = jnp.zeros((e + 1,), bool).at[root_TK.reshape(-1)].set(True)[:e]    # [E]
    expert_E = jnp.arange(e, dtype=jnp.int32)
    # lexsort: last key is primary. Mass descending, then lower id.
    mass_order_E = jnp.lexsort((expert_E, -mass_E))
    prio_order_E = jnp.lexsort((expert_E, -mass_E, ~root_E))
    mass_rank_E = jnp.zeros((e,), jnp.int32).at[mass_order_E].set(expert_E)
    by_mass_E = mass_rank_E < budget
    if mass_fraction is not None:
        sorted_E = mass_E[mass_order_E]
        before_E = (jnp.cumsum(sorted_E) - sorted_E)[mass_rank_E]  # mass ranked ahead
        by_mass_E &= (mass_rank_E < top_k) | (before_E < mass_fraction * jnp.sum(mass_E))
    return _capped(root_E | by_mass_E, prio_order_E, max_active)


def _capped(kept_E, prio_order_E, max_active):
    """(kept_A, kept_E) with at most ``max_active`` kept: the kept experts are a prefix of
    the priority order ``prio_order_E``, so the lowest-priority ones are dropped."""
    e = kept_E.shape[0]
    expert_E = jnp.arange(e, dtype=jnp.int32)
    prio_rank_E = jnp.zeros((e,), jnp.int32).at[prio_order_E].set(expert_E)
    kept_E = kept_E & (prio_rank_E < max_active)
    num_kept = jnp.sum(kept_E.astype(jnp.int32))
    kept_A = jnp.where(jnp.arange(max_active) < num_kept,
                       prio_order_E[:max_active].astype(jnp.int32), e)
    return kept_A, kept_E


def _select_experts_path(probs_TE, valid_T, root_T, priority_T, *, top_k, budget,
                         max_active):
    """(kept_A, kept_E) by path selection (module docstring): the longest prefix of the
    tokens in priority order whose natural experts fit in B, then mass."""
    t, e = probs_TE.shape
    nat_TK, _ = route_topk(probs_TE, top_k, False)
    hit_TE = jnp.zeros((t, e + 1), bool).at[jnp.arange(t)[:, None], nat_TK].set(True)[:, :e]
    root_E = jnp.any(hit_TE & (root_T & valid_T)[:, None], axis=0)               # [E]
    cand_T = valid_T & ~root_T
    score_T = jnp.where(cand_T, priority_T.astype(jnp.float32), -jnp.inf)
    order_T = jnp.lexsort((jnp.arange(t), -score_T))  # priority descending, then index
    cov_TE = jnp.cumsum((hit_TE & cand_T[:, None])[order_T].astype(jnp.int32), axis=0) > 0
    size_T = jnp.sum(cov_TE & ~root_E[None, :], axis=1)  # non-decreasing: fits is a prefix
    fits_T = size_T <= budget
    path_E = jnp.any(cov_TE & fits_T[:, None], axis=0) & ~root_E
    mass_E = jnp.sum(jnp.where(valid_T[:, None], probs_TE, 0.0), axis=0)
    expert_E = jnp.arange(e, dtype=jnp.int32)
    rest_E = ~(root_E | path_E)
    free = budget - jnp.sum(path_E.astype(jnp.int32))
    rest_order_E = jnp.lexsort((expert_E, -mass_E, ~rest_E))
    rest_rank_E = jnp.zeros((e,), jnp.int32).at[rest_order_E].set(expert_E)
    kept_E = root_E | path_E | (rest_E & (rest_rank_E < free))
    return _capped(kept_E, jnp.lexsort((expert_E, -mass_E, ~path_E, ~root_E)), max_active)


def _normalise(w_TK, norm_topk_prob):
    if not norm_topk_prob:
        return w_TK
    s_T1 = jnp.sum(w_TK, axis=-1, keepdims=True)
    return jnp.where(s_T1 > 0, w_TK / jnp.where(s_T1 > 0, s_T1, 1.0), 0.0)


def budgeted_dispatch_ref(probs_TE, *, top_k, budget, policy, norm_topk_prob,
                          token_valid_T=None, root_T=None, block_rows=8,
                          mass_fraction=None, priority_T=None) -> BudgetPlan:
    """Pure-jnp reference of :func:`budgeted_dispatch` (lax.top_k, sorts, cumsums), and
    the only implementation of path selection (``priority_T``).

    Same arguments and result; ``block_rows`` sizes the returned layout.
    """
    t, e = probs_TE.shape
    p_TE = probs_TE.astype(jnp.float32)
    valid_T = jnp.ones((t,), bool) if token_valid_T is None else token_valid_T.astype(bool)
    has_root = root_T is not None
    root_T = jnp.zeros((t,), bool) if root_T is None else root_T.astype(bool)
    a = kept_capacity(e, top_k, budget, has_root)
    if priority_T is not None:
        kept_A, kept_E = _select_experts_path(p_TE, valid_T, root_T, priority_T,
                                              top_k=top_k, budget=budget, max_active=a)
    else:
        kept_A, kept_E = _select_experts_ref(p_TE, valid_T, root_T, top_k=top_k,
                                             budget=budget, max_active=a,
                                             mass_fraction=mass_fraction)
    if policy == "substitute":
        score_TE = jnp.where(kept_E[None, :], p_TE, -1.0)
        w_TK, ids_TK = jax.lax.top_k(score_TE, top_k)
        ok_TK = valid_T[:, None] & (w_TK >= 0)
        alive_T = valid_T
    elif policy == "truncate":
        ids_TK, w_TK = route_topk(p_TE, top_k, False)
        ok_TK = valid_T[:, None] & kept_E[ids_TK]
        alive_T = valid_T
    else:
        ids_TK, w_TK = route_topk(p_TE, top_k, False)
        alive_T = valid_T & jnp.all(kept_E[ids_TK], axis=-1)
        ok_TK = jnp.broadcast_to(alive_T[:, None], ids_TK.shape)
    ids_TK = jnp.where(ok_TK, ids_TK, e).astype(jnp.int32)
    combine_TK = _normalise(jnp.where(ok_TK, w_TK, 0.0), norm_topk_prob)
    layout = gather_layout(ids_TK, num_experts=e, max_active=a, block_rows=block_rows)
    return BudgetPlan(kept_A=kept_A, kept_E=kept_E,
                      num_kept=jnp.sum(kept_E.astype(jnp.int32)), ids_TK=ids_TK,
                      combine_TK=combine_TK, alive_T=alive_T, layout=layout, max_active=a)


# --------------------------------------------------------------------------- kernel


def _iota(shape, dim):
    # Mosaic wants int32 iotas; the index math then runs in float32.
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim).astype(jnp.float32)


def _topk_columns(score_TE, k, col_TE, num_experts):
    """K rounds of (row max, first column reaching it). Returns [(idx_T1, val_T1)]."""
    picks = []
    for _ in range(k):
        val_T1 = jnp.max(score_TE, axis=1, keepdims=True)
        idx_T1 = jnp.min(jnp.where(score_TE == val_T1, col_TE, float(num_experts)),
                         axis=1, keepdims=True)
        score_TE = jnp.where(col_TE == idx_T1, -jnp.inf, score_TE)
        picks.append((idx_T1, val_T1))
    return picks


def _dispatch_kernel(probs_ref, valid_ref, root_ref,
                     ids_ref, combine_ref, alive_ref, kept_e_ref, kept_a_ref, slot_ref,
                     tile_expert_ref, num_used_ref, *,
                     num_experts, top_k, budget, max_active, policy, norm_topk_prob,
                     block_rows, num_tiles, mass_fraction):
    """Whole-array refs (shapes possibly padded, real sizes are the static args):
    probs [T, E] f32 (padded experts hold -1), valid/root [T, 1] f32 (0/1);
    outputs ids/combine/slot [T, K], alive [T, 1], kept_e [1, E], kept_a [A, 1],
    tile_expert [N, 1], num_used [1, 1]."""
    e, b = num_experts, block_rows
    f32 = jnp.float32
    p_TE = probs_ref[...].astype(f32)
    t, ep = p_TE.shape
    ap, np_, kp = kept_a_ref.shape[0], tile_expert_ref.shape[0], ids_ref.shape[1]
    valid_T1 = valid_ref[...] > 0
    root_T1 = (root_ref[...] > 0) & valid_T1
    col_TE = _iota((t, ep), 1)
    col_1E = _iota((1, ep), 1)

    # ---- expert selection
    nat = _topk_columns(p_TE, top_k, col_TE, e)
    nat_hit_TE = jnp.zeros((t, ep), f32)
    for idx_T1, _ in nat:
        nat_hit_TE = jnp.maximum(nat_hit_TE, jnp.where(col_TE == idx_T1, 1.0, 0.0))
    mass_1E = jnp.sum(jnp.where(valid_T1, p_TE, 0.0), axis=0, keepdims=True)
    root_1E = jnp.max(jnp.where(root_T1, nat_hit_TE, 0.0), axis=0, keepdims=True)
    row_EE, colm_EE = _iota((ep, ep), 0), _iota((ep, ep), 1)

    def as_column(v_1E):  # [1, E] -> [E, 1] without a transpose: keep the diagonal.
        return jnp.sum(jnp.where(row_EE == colm_EE, v_1E, 0.0), axis=1, keepdims=True)

    mass_E1, root_E1 = as_column(mass_1E), as_column(root_1E)
    # ahead[e', e]: expert e' (row) precedes expert e (column).
    by_mass_EE = (mass_E1 > mass_1E) | ((mass_E1 == mass_1E) & (row_EE < colm_EE))
    by_prio_EE = (root_E1 > root_1E) | ((root_E1 == root_1E) & by_mass_EE)
    mass_rank_1E = jnp.sum(jnp.where(by_mass_EE, 1.0, 0.0), axis=0, keepdims=True)
    prio_rank_1E = jnp.sum(jnp.where(by_prio_EE, 1.0, 0.0), axis=0, keepdims=True)
    by_mass_1E = mass_rank_1E < budget
    if mass_fraction is not None:  # mass of the experts ranked ahead of each expert
        before_1E = jnp.sum(jnp.where(by_mass_EE, mass_E1, 0.0), axis=0, keepdims=True)
        total_11 = jnp.sum(jnp.where(col_1E < e, mass_1E, 0.0), axis=1, keepdims=True)
        by_mass_1E = by_mass_1E & ((mass_rank_1E < top_k)
                                   | (before_1E < mass_fraction * total_11))
    kept_1E = (((root_1E > 0) | by_mass_1E) & (prio_rank_1E < max_active) & (col_1E < e))
    kept_f_1E = jnp.where(kept_1E, 1.0, 0.0)
    match_AE = (_iota((ap, ep), 0) == prio_rank_1E) & kept_1E
    kept_A1 = (jnp.sum(jnp.where(match_AE, _iota((ap, ep), 1), 0.0), axis=1, keepdims=True)
               + jnp.where(jnp.max(jnp.where(match_AE, 1.0, 0.0), axis=1, keepdims=True) > 0,
                           0.0, float(e)))

    # ---- token routing
    if policy == "substitute":
        picks = _topk_columns(jnp.where(kept_1E, p_TE, -1.0), top_k, col_TE, e)
        ok = [valid_T1 & (val_T1 >= 0) for _, val_T1 in picks]
        alive_T1 = valid_T1
    elif policy == "truncate":
        picks = nat
        ok = [valid_T1 & (jnp.sum(jnp.where(col_TE == idx_T1, kept_f_1E, 0.0), axis=1,
                                  keepdims=True) > 0) for idx_T1, _ in nat]
        alive_T1 = valid_T1
    else:
        picks = nat
        alive_T1 = valid_T1
        for idx_T1, _ in nat:
            in_kept_T1 = jnp.sum(jnp.where(col_TE == idx_T1, kept_f_1E, 0.0), axis=1,
                                 keepdims=True) > 0
            alive_T1 = alive_T1 & in_kept_T1
        ok = [alive_T1] * top_k
    ids = [jnp.where(o, idx, float(e)) for (idx, _), o in zip(picks, ok)]
    ws = [jnp.where(o, val, 0.0) for (_, val), o in zip(picks, ok)]
    if norm_topk_prob:
        s_T1 = functools.reduce(lambda u, v: u + v, ws)
        ws = [jnp.where(s_T1 > 0, w / jnp.where(s_T1 > 0, s_T1, 1.0), 0.0) for w in ws]

    # ---- layout: groups by ascending expert, flat (t, k) order inside, tile aligned
    onehots = [jnp.where((col_TE == idx) & (idx < e), 1.0, 0.0) for idx in ids]
    counts_TE = functools.reduce(lambda u, v: u + v, onehots)
    tiles_1E = jnp.floor((jnp.sum(counts_TE, axis=0, keepdims=True) + (b - 1)) / b)
    first_tile_1E = jnp.sum(jnp.where(row_EE < colm_EE, as_column(tiles_1E), 0.0), axis=0,
                            keepdims=True)
    lower_TT = jnp.where(_iota((t, t), 1) < _iota((t, t), 0), 1.0, 0.0)
    before_TE = jnp.dot(lower_TT, counts_TE, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=f32)
    r = float(num_tiles * b)
    slots, prev_TE = [], jnp.zeros((t, ep), f32)
    for idx, oh_TE in zip(ids, onehots):
        base_TE = first_tile_1E * b + before_TE + prev_TE
        slot_T1 = jnp.sum(oh_TE * base_TE, axis=1, keepdims=True)
        slots.append(jnp.where((idx < e) & (slot_T1 < r), slot_T1, r))
        prev_TE = prev_TE + oh_TE
    used_11 = jnp.minimum(jnp.sum(tiles_1E, axis=1, keepdims=True), float(num_tiles))
    n_NE = jnp.minimum(_iota((np_, ep), 0), jnp.maximum(used_11 - 1.0, 0.0))
    covers_NE = (tiles_1E > 0) & (first_tile_1E <= n_NE)
    te_N1 = jnp.max(jnp.where(covers_NE, _iota((np_, ep), 1), -1.0), axis=1, keepdims=True)
    te_N1 = jnp.where(te_N1 < 0, float(e - 1), te_N1)

    # ---- stores: assemble [T, K] outputs column by column with a select.
    kcol_TK = _iota((t, kp), 1)

    def columns(vals):
        out = jnp.zeros((t, kp), f32)
        for j, v_T1 in enumerate(vals):
            out = jnp.where(kcol_TK == j, v_T1, out)
        return out

    ids_ref[...] = columns(ids).astype(jnp.int32)
    combine_ref[...] = columns(ws)
    slot_ref[...] = columns(slots).astype(jnp.int32)
    alive_ref[...] = jnp.where(alive_T1, 1, 0).astype(jnp.int32)
    kept_e_ref[...] = kept_f_1E.astype(jnp.int32)
    kept_a_ref[...] = kept_A1.astype(jnp.int32)
    tile_expert_ref[...] = te_N1.astype(jnp.int32)
    num_used_ref[...] = used_11.astype(jnp.int32)


def _round_up(n, m):
    return -(-n // m) * m


def _next_pow2(n, minimum=1):
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _dispatch_pallas(p_TE, valid_T, root_T, *, platform, interpret, top_k, budget,
                     max_active, policy, norm_topk_prob, block_rows, mass_fraction=None):
    t, e = p_TE.shape
    n_tiles = num_row_tiles(t * top_k, max_active, block_rows)
    if platform == "tpu":
        tp, ep, kp, ap, np_ = _round_up(t, 8), _round_up(e, 128), top_k, max_active, n_tiles
        params = pltpu.CompilerParams()
    else:
        tp, ep = _next_pow2(t, 16), _next_pow2(e, 16)
        kp, ap, np_ = _next_pow2(top_k), _next_pow2(max_active), _next_pow2(n_tiles)
        params = pltriton.CompilerParams(num_warps=4, num_stages=1)
    # Padded experts get prob -1: never picked, never outrank a real expert.
    p_pad = jnp.pad(p_TE, ((0, tp - t), (0, ep - e)), constant_values=-1.0)
    valid_pad = jnp.pad(valid_T.astype(jnp.float32), (0, tp - t))[:, None]
    root_pad = jnp.pad(root_T.astype(jnp.float32), (0, tp - t))[:, None]
    i32 = jnp.int32
    out_shape = (
        jax.ShapeDtypeStruct((tp, kp), i32),           # ids
        jax.ShapeDtypeStruct((tp, kp), jnp.float32),   # combine
        jax.ShapeDtypeStruct((tp, 1), i32),            # alive
        jax.ShapeDtypeStruct((1, ep), i32),            # kept_E
        jax.ShapeDtypeStruct((ap, 1), i32),            # kept_A
        jax.ShapeDtypeStruct((tp, kp), i32),           # slot
        jax.ShapeDtypeStruct((np_, 1), i32),           # tile_expert
        jax.ShapeDtypeStruct((1, 1), i32),             # num_used_tiles
    )
    kernel = functools.partial(
        _dispatch_kernel, num_experts=e, top_k=top_k, budget=budget, max_active=max_active,
        policy=policy, norm_topk_prob=norm_topk_prob, block_rows=block_rows,
        num_tiles=n_tiles, mass_fraction=mass_fraction)
    ids, combine, alive, kept_e, kept_a, slot, tile_expert, used = pl.pallas_call(
        kernel, out_shape=out_shape, compiler_params=params, interpret=interpret,
        name="budgeted_dispatch")(p_pad, valid_pad, root_pad)
    # Padded tokens are invalid, so their slots are R; only real rows are kept anyway.
    ids_TK, slot_TK = ids[:t, :top_k], slot[:t, :top_k]
    kept_E = kept_e[0, :e] > 0
    layout = GatherLayout(slot_TK=slot_TK, tile_expert_N=tile_expert[:n_tiles, 0],
                          num_used_tiles=used[0], block_rows=block_rows)
    return BudgetPlan(kept_A=kept_a[:max_active, 0], kept_E=kept_E,
                      num_kept=jnp.sum(kept_E.astype(i32)), ids_TK=ids_TK,
                      combine_TK=combine[:t, :top_k], alive_T=alive[:t, 0] > 0,
                      layout=layout, max_active=max_active)


# --------------------------------------------------------------------------- wrapper


def _validate_inputs(probs_TE, *, top_k, budget, policy, token_valid_T, root_T, platform,
                     block_rows, mass_fraction=None):
    if probs_TE.ndim != 2:
        raise ValueError(f"probs_TE must be [T, E], got shape {probs_TE.shape}")
    if not jnp.issubdtype(probs_TE.dtype, jnp.floating):
        raise ValueError(f"probs_TE must be floating, got dtype {probs_TE.dtype}")
    t, e = probs_TE.shape
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in [1, E={e}], got {top_k}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if mass_fraction is not None and not 0.0 < mass_fraction <= 1.0:
        raise ValueError(f"mass_fraction must be in (0, 1] or None, got {mass_fraction}")
    for name, v in (("token_valid_T", token_valid_T), ("root_T", root_T)):
        if v is not None and v.shape != (t,):
            raise ValueError(f"{name} must have shape [T]=({t},), got {v.shape}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    if platform != "xla" and t > MAX_KERNEL_TOKENS:
        raise ValueError(f"T={t} exceeds the dispatch kernel's MAX_KERNEL_TOKENS="
                         f"{MAX_KERNEL_TOKENS} (it holds a [T, T] matrix); use backend='xla'")


@functools.partial(
    jax.jit,
    static_argnames=("top_k", "budget", "policy", "norm_topk_prob", "block_rows", "backend",
                     "interpret", "mass_fraction"))
def budgeted_dispatch(
    probs_TE: jax.Array,
    *,
    top_k: int,
    budget: int,
    policy: str = "prune",
    norm_topk_prob: bool,
    token_valid_T: jax.Array | None = None,
    root_T: jax.Array | None = None,
    block_rows: int | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    mass_fraction: float | None = None,
    priority_T: jax.Array | None = None,
) -> BudgetPlan:
    """Route T tokens to experts while loading at most B (+ root's K) experts.

    See the module docstring for the exact selection and policy semantics.

    Args:
      probs_TE: [T, E] router probabilities (softmax over E).
      top_k: K.
      budget: B >= 1, experts kept by mass (B >= E keeps every expert with any mass).
      policy: ``"prune"`` (lossless), ``"substitute"`` (MoE-Spec) or ``"truncate"``.
      norm_topk_prob: renormalise combine weights over the chosen experts.
      token_valid_T: optional bool [T]; False = padding/masked draft token.
      root_T: optional bool [T]; roots always keep their natural experts.
      block_rows: rows per tile of the returned layout; default from the tuning table of
        the backend (must match the expert-gather kernel it feeds).
      backend: ``"tpu"``/``"gpu"`` (Pallas kernel), ``"cpu"`` (TPU kernel interpreted),
        ``"xla"`` (the jnp reference); default from ``jax.default_backend()``.
      interpret: force interpret mode for the kernel (default: only on CPU).
      mass_fraction: None = keep the top-B by mass; f in (0, 1] = keep experts in mass
        order until f of the total mass is covered (at least K, at most B).
      priority_T: optional float [T]: path selection (module docstring), e.g. each draft
        node's path log-probability. Runs the XLA implementation on every backend; not
        combinable with ``mass_fraction``.

    Returns:
      BudgetPlan with A = min(E, B) (no roots) or min(E, B + K) (roots given).
    """
    platform, interp, table = tuning.resolve_backend(backend, interpret, allow_xla=True)
    t, e = probs_TE.shape
    if block_rows is None:
        block_rows = tuning.GATHER_BLOCK_SIZES[table].block_rows
    _validate_inputs(probs_TE, top_k=top_k, budget=budget, policy=policy,
                     token_valid_T=token_valid_T, root_T=root_T, platform=platform,
                     block_rows=block_rows, mass_fraction=mass_fraction)
    if priority_T is not None:
        if mass_fraction is not None:
            raise ValueError(f"priority_T (path selection) and mass_fraction={mass_fraction} "
                             "are two different selections: pass one")
        if priority_T.shape != (t,):
            raise ValueError(f"priority_T has shape {priority_T.shape}; expected ({t},)")
    if platform == "xla" or priority_T is not None:
        return budgeted_dispatch_ref(probs_TE, top_k=top_k, budget=budget, policy=policy,
                                     norm_topk_prob=norm_topk_prob,
                                     token_valid_T=token_valid_T, root_T=root_T,
                                     block_rows=block_rows, mass_fraction=mass_fraction,
                                     priority_T=priority_T)
    valid_T = jnp.ones((t,), bool) if token_valid_T is None else token_valid_T
    has_root = root_T is not None
    root_T = jnp.zeros((t,), bool) if root_T is None else root_T
    return _dispatch_pallas(
        probs_TE.astype(jnp.float32), valid_T, root_T, platform=platform,
        interpret=interp, top_k=top_k, budget=budget,
        max_active=kept_capacity(e, top_k, budget, has_root), policy=policy,
        norm_topk_prob=norm_topk_prob, block_rows=block_rows, mass_fraction=mass_fraction)
