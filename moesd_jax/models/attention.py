"""GQA attention over a static KV cache with an optional tree mask.

Queries of step t (T per step) see: every committed cache position s < start_b, plus the
new block's positions start_b + j for which ``tree_mask[t, j]`` (causal by default).
Trees pass their ancestor mask; chains and prefill use the causal default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moesd_jax import kv_cache
from moesd_jax.config import ModelConfig
from moesd_jax.models.layers import RMSNorm, param, rope


def build_mask(start_B: jax.Array, t: int, s: int, tree_mask=None) -> jax.Array:
    """Attention mask [B, T, S] for T new tokens written at ``start_B``.

    Args:
      start_B: int32 [B] first new position per row (= committed length).
      t: T new tokens; s: S cache capacity.
      tree_mask: bool [T, T] or [B, T, T], ``tree_mask[i, j]`` = token j is an ancestor of
        (or is) token i. None = causal.
    """
    if tree_mask is None:
        tree_mask = jnp.tril(jnp.ones((t, t), jnp.bool_))
    if tree_mask.ndim == 2:
        tree_mask = jnp.broadcast_to(tree_mask[None], (start_B.shape[0], t, t))
    rel_BS = jnp.arange(s, dtype=jnp.int32)[None, :] - start_B[:, None]
    in_block_BS = (rel_BS >= 0) & (rel_BS < t)
    idx_BS = jnp.clip(rel_BS, 0, t - 1)
    block_BTS = jnp.take_along_axis(tree_mask, jnp.broadcast_to(idx_BS[:, None, :],
                                                                (idx_BS.shape[0], t, s)),
                                    axis=2)
    return (rel_BS < 0)[:, None, :] | (in_block_BS[:, None, :] & block_BTS)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional q/k norm and qkv bias."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, g, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dh
        dt = cfg.param_dtype
        self.cfg = cfg
        # fan-in of the projections is d (param's default would take the head count)
        self.wq_DHK = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), dt, scale=d**-0.5)
        self.wk_DGK = param(rngs, (d, g, dh), ("embed", "kv_heads", "head_dim"), dt,
                            scale=d**-0.5)
        self.wv_DGK = param(rngs, (d, g, dh), ("embed", "kv_heads", "head_dim"), dt,
                            scale=d**-0.5)
        self.wo_HKD = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), dt,
                            scale=(h * dh) ** -0.5)
        if cfg.qkv_bias:
            self.bq_HK = param(None, (h, dh), ("heads", "head_dim"), dt, init="zeros")
            self.bk_GK = param(None, (g, dh), ("kv_heads", "head_dim"), dt, init="zeros")
            self.bv_GK = param(None, (g, dh), ("kv_heads", "head_dim"), dt, init="zeros")
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(dh, cfg.rms_eps, dt)
            self.k_norm = RMSNorm(dh, cfg.rms_eps, dt)
        elif cfg.qk_norm == "all":
            self.q_norm = RMSNorm(h * dh, cfg.rms_eps, dt)
            self.k_norm = RMSNorm(g * dh, cfg.rms_eps, dt)

    def __call__(self, x_BTD, positions_BT, k_cache, v_cache, layer: int, start_B,
                 tree_mask=None):
        """Returns (out_BTD, k_cache, v_cache) with this step's K/V written at start_B."""
        cfg = self.cfg
        b, t, _ = x_BTD.shape
        h, g, dh = cfg.num_heads, cfg.num_kv_heads, cfg.dh
        dt = x_BTD.dtype
        q = jnp.einsum("BTD,DHK->BTHK", x_BTD, self.wq_DHK[...].astype(dt))
        k = jnp.einsum("BTD,DGK->BTGK", x_BTD, self.wk_DGK[...].astype(dt))
        v = jnp.einsum("BTD,DGK->BTGK", x_BTD, self.wv_DGK[...].astype(dt))
        if cfg.qkv_bias:
            q = q + self.bq_HK[...].astype(dt)[None, None]
            k = k + self.bk_GK[...].astype(dt)[None, None]
            v = v + self.bv_GK[...].astype(dt)[None, None]
        if cfg.qk_norm == "all":  # OLMoE: one norm over all heads' q (and k)
            q = self.q_norm(q.reshape(b, t, h * dh)).reshape(b, t, h, dh)
            k = self.k_norm(k.reshape(b, t, g * dh)).reshape(b, t, g, dh)
        if cfg.clip_qkv is not None:
            c = cfg.clip_qkv
            q, k, v = jnp.clip(q, -c, c), jnp.clip(k, -c, c), jnp.clip(v, -c, c)
        if cfg.qk_norm == "head":  # Qwen3: per-head norm
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope(q, positions_BT, cfg.rope_theta)
        k = rope(k, positions_BT, cfg.rope_theta)

        with jax.named_scope("kv_write"):
            k_cache = kv_cache.write(k_cache, layer, k, start_B)
            v_cache = kv_cache.write(v_cache, layer, v, start_B)
        keys_BSGK = k_cache[layer].astype(dt)
        vals_BSGK = v_cache[layer].astype(dt)
        s = keys_BSGK.shape[1]
        mask_BTS = build_mask(start_B, t, s, tree_mask)

        r = h // g
        q_BTGRK = q.reshape(b, t, g, r, dh)
        scores = jnp.einsum("BTGRK,BSGK->BGRTS", q_BTGRK, keys_BSGK,
                            preferred_element_type=jnp.float32) * (dh**-0.5)
        scores = jnp.where(mask_BTS[:, None, None, :, :], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("BGRTS,BSGK->BTGRK", probs, vals_BSGK).reshape(b, t, h, dh)
        out_BTD = jnp.einsum("BTHK,HKD->BTD", out, self.wo_HKD[...].astype(dt))
        return out_BTD, k_cache, v_cache
