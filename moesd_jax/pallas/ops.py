"""Backend selection for the Pallas MoE kernels, and the dense float32 reference.

``expert_ffn`` is the single entry point the MoE block calls; it picks the kernel by
``jax.default_backend()`` (or an explicit ``backend``):

  tpu -> Mosaic TPU expert-gather kernel
  gpu -> Triton expert-gather kernels
  cpu -> the TPU kernel in interpret mode (slow; for tests and parity, not serving: the
         CPU serving default is the XLA ``gather`` dispatch of ``moesd_jax.models.moe``)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moesd_jax.pallas import tuning
from moesd_jax.pallas.budgeted_dispatch import BudgetPlan, budgeted_dispatch, route_topk
from moesd_jax.pallas.expert_gather import GatherLayout, expert_gather

__all__ = ["BudgetPlan", "budgeted_dispatch", "expert_ffn", "expert_ffn_ref", "route_topk"]


@functools.partial(jax.jit, static_argnames=("max_active", "backend", "interpret"))
def expert_ffn(
    x_TD: jax.Array,
    w_gate_EDF: jax.Array,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
    ids_TK: jax.Array,
    combine_TK: jax.Array,
    *,
    max_active: int | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    layout: GatherLayout | None = None,
) -> jax.Array:
    """y[t] = sum_k combine[t, k] * SwiGLU_{ids[t, k]}(x[t]), reading only active experts.

    Args:
      x_TD: [T, D] float32 or bfloat16.
      w_gate_EDF, w_up_EDF: [E, D, F] expert gate / up projections.
      w_down_EFD: [E, F, D] expert down projections.
      ids_TK: int32 [T, K] expert ids; E = dropped (contributes 0, loads nothing).
      combine_TK: float32 [T, K] combine weights (0 where dropped).
      max_active: A, static cap on distinct active experts (default min(E, T*K); must
        bound the routing, e.g. ``BudgetPlan.max_active``).
      backend: ``"tpu"``, ``"gpu"`` or ``"cpu"``; default ``jax.default_backend()``.
      interpret: force Pallas interpret mode (default: only for ``"cpu"``).
      layout: optional precomputed ``GatherLayout`` (``BudgetPlan.layout``) so the
        permutation is not recomputed; its ``block_rows`` sets the row tile.

    Returns:
      y_TD: [T, D] in x's dtype (float32 accumulation).
    """
    platform, interp, _ = tuning.resolve_backend(backend, interpret)
    return expert_gather(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK, layout,
                         max_active=max_active, platform=platform, interpret=interp)


def expert_ffn_ref(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK):
    """Dense float32 reference of :func:`expert_ffn`: every expert on every token,
    weighted by the scattered combine weights. Returns float32 [T, D]."""
    e = w_gate_EDF.shape[0]
    hp = jax.lax.Precision.HIGHEST
    x = x_TD.astype(jnp.float32)                                                # [T, D]
    g_ETF = jnp.einsum("td,edf->etf", x, w_gate_EDF.astype(jnp.float32), precision=hp)
    u_ETF = jnp.einsum("td,edf->etf", x, w_up_EDF.astype(jnp.float32), precision=hp)
    y_ETD = jnp.einsum("etf,efd->etd", jax.nn.silu(g_ETF) * u_ETF,
                       w_down_EFD.astype(jnp.float32), precision=hp)
    # Dropped ids (== E) match no expert in the one-hot.
    onehot_TKE = ids_TK[:, :, None] == jnp.arange(e, dtype=ids_TK.dtype)[None, None, :]
    weight_TE = jnp.sum(jnp.where(onehot_TKE, combine_TK.astype(jnp.float32)[:, :, None],
                                  0.0), axis=1)
    return jnp.einsum("etd,te->td", y_ETD, weight_TE, precision=hp)             # [T, D]
