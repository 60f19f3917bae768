"""GQA attention over a static KV cache with an optional tree mask.

Cache slots below a row's committed length ``start_b`` are visible to every new query;
slots at or above it are *uncommitted* and visible only through the tree mask: a query
sees slot ``start_b + j`` of the *tree region* ``[start_b, start_b + W)`` iff
``tree_mask[t, j]``. The T new tokens are written into the region at offsets
``write_offsets_T`` (default ``0..T-1``, with a causal ``[T, T]`` mask). Trees pass their
ancestor mask; a tree drafter that feeds one level at a time writes each level's nodes at
their own offsets and its mask rows reach the ancestors written by earlier calls, so no
node is fed twice. Chains and prefill use the causal default. Attention reads the cache
in blocks up to the longest live row plus the region (:func:`cached_attention`), so its
cost follows the live length, not the cache capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moesd_jax import kv_cache
from moesd_jax.config import ModelConfig
from moesd_jax.models.layers import RMSNorm, param, rope

# Masked scores: a finite floor (not -inf) so blocks where a query sees nothing keep the
# online-softmax arithmetic free of inf - inf.
MASK_VALUE = -1e30
# Cache slots per attention block: the loop over blocks stops at the longest live row.
KV_BLOCK = 128


def build_mask(start_B: jax.Array, t: int, slots_S: jax.Array, tree_mask=None) -> jax.Array:
    """Attention mask [B, T, S'] of T new queries over cache slots ``slots_S``.

    Args:
      start_B: int32 [B] committed length per row (= first slot of the tree region).
      t: T new tokens.
      slots_S: int32 [S'] the cache slot indices the mask covers (a block of the cache).
      tree_mask: bool [T, W] or [B, T, W]: ``tree_mask[i, j]`` = query i sees region slot
        ``start + j`` (an ancestor of i, or i itself). None = causal ``[T, T]``.
    """
    b = start_B.shape[0]
    s = slots_S.shape[0]
    if tree_mask is None:
        tree_mask = jnp.tril(jnp.ones((t, t), jnp.bool_))
    w = tree_mask.shape[-1]
    if tree_mask.ndim == 2:
        tree_mask = jnp.broadcast_to(tree_mask[None], (b, t, w))
    rel_BS = slots_S[None, :] - start_B[:, None]
    in_region_BS = (rel_BS >= 0) & (rel_BS < w)
    idx_BS = jnp.clip(rel_BS, 0, w - 1)
    region_BTS = jnp.take_along_axis(tree_mask,
                                     jnp.broadcast_to(idx_BS[:, None, :], (b, t, s)), axis=2)
    return (rel_BS < 0)[:, None, :] | (in_region_BS[:, None, :] & region_BTS)


def cached_attention(q_BTGRC, k_cache, v_cache, layer: int, start_B, tree_mask=None,
                     block: int = KV_BLOCK):
    """Attention of T new queries over one layer of the cache, up to the longest live row.

    The cache is read in blocks of ``block`` slots with an online softmax (running max and
    normaliser, as in flash attention); the number of blocks is ``ceil((max(start_B) + W)
    / block)`` (W = the tree region's width, T by default), a run-time bound, so a
    64-token context costs the same in a 4,096-slot cache as in a 128-slot one and nothing
    copies or transposes the whole layer. Static shapes throughout: the last block is
    clamped inside the cache and its slots already covered by the previous block are
    masked.

    Args:
      q_BTGRC: queries [B, T, G, R, C] (R query heads per kv head), RoPE applied.
      k_cache, v_cache: [L, B, S, G, C] with this step's K/V already written in the region.
      layer: static layer index. start_B: int32 [B] committed length per row.
      tree_mask: see :func:`build_mask`.

    Returns:
      [B, T, G, R, C] attention output in the queries' dtype.
    """
    b, t, g, r, c = q_BTGRC.shape
    s = k_cache.shape[2]
    blk = min(block, s)
    dt = q_BTGRC.dtype
    q = q_BTGRC.astype(jnp.float32) * (c**-0.5)
    w = t if tree_mask is None else tree_mask.shape[-1]
    n_blocks = (jnp.max(start_B) + w + blk - 1) // blk

    def block(i, carry):
        m_BGRT, l_BGRT, acc_BGRTC = carry
        s0 = jnp.minimum(i * blk, s - blk)  # clamped last block
        k = jax.lax.dynamic_slice_in_dim(k_cache[layer], s0, blk, axis=1)  # [B, blk, G, C]
        v = jax.lax.dynamic_slice_in_dim(v_cache[layer], s0, blk, axis=1)
        slots = s0 + jnp.arange(blk, dtype=jnp.int32)
        mask_BTS = build_mask(start_B, t, slots, tree_mask) & (slots >= i * blk)[None, None]
        mask = mask_BTS[:, None, None]  # [B, 1, 1, T, blk]
        scores = jnp.einsum("BTGRC,BSGC->BGRTS", q, k.astype(jnp.float32))
        scores = jnp.where(mask, scores, MASK_VALUE)
        m_new = jnp.maximum(m_BGRT, jnp.max(scores, axis=-1))
        p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
        alpha = jnp.exp(m_BGRT - m_new)
        l_new = alpha * l_BGRT + jnp.sum(p, axis=-1)
        acc = alpha[..., None] * acc_BGRTC + jnp.einsum("BGRTS,BSGC->BGRTC", p,
                                                        v.astype(jnp.float32))
        return m_new, l_new, acc

    def body(carry, i):
        # blocks past the longest live row are skipped at run time; a scan over the static
        # block count (not a while loop with a dynamic bound) keeps training differentiable
        return jax.lax.cond(i < n_blocks, block, lambda i, c: c, i, carry), None

    init = (jnp.full((b, g, r, t), MASK_VALUE, jnp.float32), jnp.zeros((b, g, r, t), jnp.float32),
            jnp.zeros((b, g, r, t, c), jnp.float32))
    (_, l_BGRT, acc), _ = jax.lax.scan(body, init, jnp.arange(-(-s // blk), dtype=jnp.int32))
    out = acc / jnp.maximum(l_BGRT, 1e-30)[..., None]
    return jnp.einsum("BGRTC->BTGRC", out).astype(dt)


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
                 tree_mask=None, write_offsets_T=None):
        """Returns (out_BTD, k_cache, v_cache) with this step's K/V written at
        ``start_B + write_offsets_T`` (default ``start_B + [0, T)``)."""
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
            k_cache = kv_cache.write(k_cache, layer, k, start_B, write_offsets_T)
            v_cache = kv_cache.write(v_cache, layer, v, start_B, write_offsets_T)
        r = h // g
        with jax.named_scope("attend"):
            out = cached_attention(q.reshape(b, t, g, r, dh), k_cache, v_cache, layer, start_B,
                                   tree_mask).reshape(b, t, h, dh)
        out_BTD = jnp.einsum("BTHK,HKD->BTD", out, self.wo_HKD[...].astype(dt))
        return out_BTD, k_cache, v_cache
