"""Static-shape KV cache with per-row lengths.

Layout: ``k``/``v`` are ``[L, B, S, G, Dh]``; ``lengths`` ``[B]`` int32 counts the committed
positions of each row. A forward pass writes its T new entries at ``lengths .. lengths+T``
(or at explicit offsets from ``lengths``; out-of-range writes are dropped, never clamped
onto other positions) and leaves ``lengths`` alone: the caller commits what it accepts
with :func:`advance` (chains) or :func:`compact` (trees, moving the accepted path's
entries into contiguous positions). Entries at positions >= lengths are uncommitted:
attention sees them only through a tree mask (the tree being verified or drafted).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, G, Dh]
    v: jax.Array  # [L, B, S, G, Dh]
    lengths: jax.Array  # [B] int32

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @classmethod
    def init(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int,
             head_dim: int, dtype=jnp.float32) -> KVCache:
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch,), jnp.int32))


def write(cache_LBSGD: jax.Array, layer: int, new_BTGD: jax.Array, start_B: jax.Array,
          offsets_T: jax.Array | None = None) -> jax.Array:
    """Writes T new entries of one layer at ``start_B + offsets_T`` (default ``[0, T)``);
    drops out-of-range ones."""
    b, t = new_BTGD.shape[:2]
    if offsets_T is None:
        offsets_T = jnp.arange(t, dtype=jnp.int32)
    pos_BT = start_B[:, None] + offsets_T.astype(jnp.int32)[None, :]
    b_BT = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
    return cache_LBSGD.at[layer, b_BT, pos_BT].set(new_BTGD.astype(cache_LBSGD.dtype),
                                                   mode="drop")


def advance(cache: KVCache, n_B: jax.Array) -> KVCache:
    """Commits the first ``n_B`` of the entries written at ``lengths`` (chain acceptance)."""
    return cache.replace(lengths=cache.lengths + n_B.astype(jnp.int32))


def rollback(cache: KVCache, n_B: jax.Array) -> KVCache:
    """Forgets the last ``n_B`` committed entries of each row."""
    return cache.replace(lengths=jnp.maximum(cache.lengths - n_B.astype(jnp.int32), 0))


def compact(cache: KVCache, src_BJ: jax.Array, n_B: jax.Array) -> KVCache:
    """Moves entries ``lengths + src_BJ[:, i]`` to ``lengths + i`` for i < P, commits n_B.

    Used after tree verification: ``src_BJ`` holds the tree-node offsets of the accepted
    path (root first), so the accepted entries become contiguous. Static shapes: P is the
    tree depth + 1; entries beyond ``n_B`` are copied too but stay uncommitted.
    """
    b, p = src_BJ.shape
    start = cache.lengths
    src = jnp.clip(start[:, None] + src_BJ, 0, cache.capacity - 1)  # [B, P]
    dst = start[:, None] + jnp.arange(p, dtype=jnp.int32)[None, :]
    b_BJ = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, p))

    def move(x_LBSGD):
        moved = x_LBSGD[:, b_BJ, src]  # [L, B, P, G, Dh]
        return x_LBSGD.at[:, b_BJ, dst].set(moved, mode="drop")

    return KVCache(move(cache.k), move(cache.v), start + n_B.astype(jnp.int32))


def select_rows(cache: KVCache, keep_B: jax.Array, other: KVCache) -> KVCache:
    """Row-wise choice: rows where ``keep_B`` come from ``cache``, others from ``other``."""
    m = keep_B[None, :, None, None, None]
    return KVCache(jnp.where(m, cache.k, other.k), jnp.where(m, cache.v, other.v),
                   jnp.where(keep_B, cache.lengths, other.lengths))
