"""Expert-parallel MoE dispatch: a ``shard_map`` with ``all_to_all`` around any of the
local dispatch backends (``models/moe.py`` ``DISPATCH``), used when a sharding plan
splits the experts over devices. The plan arrives explicitly (``MoEBlock.__call__(...,
plan=)``), so the compiled program depends on it through the jit cache key.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moesd_jax.config import ConfigError


def expert_parallel(plan, local_fn: Callable) -> Callable:
    """``local_fn`` itself, or :func:`ep_dispatch` around it when ``plan`` (a
    ``sharding.ShardingPlan`` or None) shards experts over more than one device."""
    if plan is None or not plan.expert_parallel:
        return local_fn
    return functools.partial(ep_dispatch, plan, local_fn)


def ep_dispatch(plan, local_fn: Callable, x_TD, w_gate_EDF, w_up_EDF,
                w_down_EFD, ids_TK, combine_TK, max_active=None):
    """Expert-parallel routed-expert FFN: same contract as the ``DISPATCH`` backends.

    Layout inside ``shard_map``: experts split over the ``expert`` rule's mesh axes (n
    groups of E/n), the expert ffn dim over ``expert_mlp``'s axes (partial sums are
    ``psum``-ed), tokens split over every other mesh axis (T is padded to a multiple).
    Each device packs, per destination, the tokens that route there (capacity C = its
    token count, so nothing is ever dropped), exchanges them with ``all_to_all``, runs
    ``local_fn`` on its E/n experts and returns the weighted outputs the same way.

    Worked example (n = 2 devices, E = 4, K = 2): a token routed to experts (1, 2) goes
    to device 0 as local ids (1, E/n=2 -> dropped) and to device 1 as (dropped, 0); the
    two partial outputs come back and are summed.

    Args:
      plan: the active plan; local_fn: a ``DISPATCH`` backend run on local experts.
      x_TD, w_*: tokens and global expert weights. ids_TK: int32 expert ids, E = dropped.
      combine_TK: float32 gates. max_active: global active-expert cap (capped at E/n).

    Returns:
      y_TD in ``x_TD.dtype``.
    """
    mesh = plan.mesh
    ep_axes = plan.axes("expert")
    tp_axes = plan.axes("expert_mlp")
    tok_axes = tuple(a for a in mesh.axis_names if a not in tp_axes and mesh.shape[a] > 1)
    n_ep = plan.size("expert")
    n_tok = math.prod(mesh.shape[a] for a in tok_axes)
    e = w_gate_EDF.shape[0]
    if e % n_ep:
        raise ConfigError(f"num_experts={e} is not divisible by mesh axis "
                          f"{'x'.join(ep_axes)}={n_ep}")
    e_loc = e // n_ep
    t, d = x_TD.shape
    k = ids_TK.shape[1]
    t_pad = -(-t // n_tok) * n_tok
    if t_pad != t:  # padding tokens route nowhere
        x_TD = jnp.pad(x_TD, ((0, t_pad - t), (0, 0)))
        ids_TK = jnp.pad(ids_TK, ((0, t_pad - t), (0, 0)), constant_values=e)
        combine_TK = jnp.pad(combine_TK, ((0, t_pad - t), (0, 0)))
    cap = t_pad // n_tok  # C: every local token fits in every destination's buffer
    local_cap = None if max_active is None else min(max_active, e_loc)
    ep_name = ep_axes[0] if len(ep_axes) == 1 else ep_axes
    tok = tok_axes if tok_axes else None
    tp = (tp_axes[0] if len(tp_axes) == 1 else tp_axes) if tp_axes else None

    def body(x_CD, wg, wu, wd, ids_CK, w_CK):
        # x_CD: this device's C tokens; wg/wu/wd: its E/n experts (and ffn shard).
        n = n_ep
        dest_CK = jnp.where(ids_CK < e, ids_CK // e_loc, n)
        j_N = jnp.arange(n, dtype=jnp.int32)
        hit_CNK = dest_CK[:, None, :] == j_N[None, :, None]
        need_CN = jnp.any(hit_CNK, axis=-1)
        slot_CN = jnp.where(need_CN, jnp.cumsum(need_CN, axis=0) - 1, cap)  # cap = unused
        j_CN = jnp.broadcast_to(j_N[None, :], (cap, n))
        with jax.named_scope("ep_pack"):
            send_x = jnp.zeros((n, cap, d), x_CD.dtype).at[j_CN, slot_CN].set(
                jnp.broadcast_to(x_CD[:, None, :], (cap, n, d)), mode="drop")
            lid_CNK = jnp.where(hit_CNK, ids_CK[:, None, :] - j_N[None, :, None] * e_loc,
                                e_loc)
            send_ids = jnp.full((n, cap, k), e_loc, jnp.int32).at[j_CN, slot_CN].set(
                lid_CNK, mode="drop")
            send_w = jnp.zeros((n, cap, k), w_CK.dtype).at[j_CN, slot_CN].set(
                jnp.where(hit_CNK, w_CK[:, None, :], 0), mode="drop")
        with jax.named_scope("ep_dispatch"):
            a2a = functools.partial(jax.lax.all_to_all, axis_name=ep_name, split_axis=0,
                                    concat_axis=0, tiled=True)
            rx, rids, rw = a2a(send_x), a2a(send_ids), a2a(send_w)
        with jax.named_scope("ep_compute"):
            y = local_fn(rx.reshape(n * cap, d), wg, wu, wd, rids.reshape(n * cap, k),
                         rw.reshape(n * cap, k), local_cap)
            if tp is not None:
                y = jax.lax.psum(y, tp)
        with jax.named_scope("ep_combine"):
            back_NCD = a2a(y.reshape(n, cap, d))
            got_CND = back_NCD[j_CN, jnp.minimum(slot_CN, cap - 1)]
            got_CND = jnp.where((slot_CN < cap)[:, :, None], got_CND.astype(jnp.float32), 0.0)
            return jnp.sum(got_CND, axis=1).astype(x_CD.dtype)

    w_in = P(ep_name, None, tp)
    fn = jax.shard_map(body, mesh=mesh,
                       in_specs=(P(tok, None), w_in, w_in, P(ep_name, tp, None),
                                 P(tok, None), P(tok, None)),
                       out_specs=P(tok, None), check_vma=False)
    y = fn(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK)
    return y[:t]
