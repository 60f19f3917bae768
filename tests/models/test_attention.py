"""Blocked attention over the live cache length == a plain masked softmax over all slots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moesd_jax.models.attention import build_mask, cached_attention


def _reference(q_BTGRC, k_cache, v_cache, layer, start_B, tree_mask):
    """Full softmax over every cache slot in float32 (the pre-blocking formulation)."""
    b, t, g, r, c = q_BTGRC.shape
    s = k_cache.shape[2]
    mask_BTS = build_mask(start_B, t, jnp.arange(s, dtype=jnp.int32), tree_mask)
    scores = jnp.einsum("BTGRC,BSGC->BGRTS", q_BTGRC, k_cache[layer]) * c**-0.5
    scores = jnp.where(mask_BTS[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("BGRTS,BSGC->BTGRC", probs, v_cache[layer])


@pytest.mark.parametrize("s,block,starts,t,tree", [
    (300, 128, (0, 5, 250), 4, False),    # 1..3 blocks, last block clamped (300 % 128 != 0)
    (256, 64, (190, 17, 63), 5, True),    # a tree mask; a row ending exactly at a block edge
    (64, 128, (10, 40, 55), 3, False),    # cache smaller than one block
    (512, 128, (0, 0, 1), 1, False),      # one query per row, tiny contexts in a large cache
])
def test_blocked_attention_matches_full_softmax(s, block, starts, t, tree):
    b, g, r, c, layers = len(starts), 2, 3, 8, 2
    ks = jax.random.split(jax.random.PRNGKey(s + t), 3)
    q = jax.random.normal(ks[0], (b, t, g, r, c))
    k_cache = jax.random.normal(ks[1], (layers, b, s, g, c))
    v_cache = jax.random.normal(ks[2], (layers, b, s, g, c))
    start = jnp.asarray(starts, jnp.int32)
    mask = None
    if tree:  # root, two children, a grandchild under the second child, ...
        parents = [-1, 0, 0, 2, 3][:t]
        anc = np.eye(t, dtype=bool)
        for i in range(t):
            j = parents[i]
            while j >= 0:
                anc[i, j] = True
                j = parents[j]
        mask = jnp.asarray(anc)
    out = cached_attention(q, k_cache, v_cache, 1, start, mask, block=block)
    ref = _reference(q, k_cache, v_cache, 1, start, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_garbage_beyond_the_live_length_is_never_read():
    """Slots past start + T hold NaN: the output stays finite (they are masked, and the
    block loop stops at the longest live row)."""
    b, t, g, r, c, s = 2, 2, 1, 2, 4, 384
    q = jax.random.normal(jax.random.PRNGKey(0), (b, t, g, r, c))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, b, s, g, c))
    v = jax.random.normal(jax.random.PRNGKey(2), (1, b, s, g, c))
    start = jnp.asarray([3, 100], jnp.int32)
    k_nan = k.at[:, :, 130:].set(jnp.nan)
    v_nan = v.at[:, :, 130:].set(jnp.nan)
    out = cached_attention(q, k_nan, v_nan, 0, start, block=128)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(_reference(q, k, v, 0, start, None)),
                               rtol=2e-5, atol=2e-5)
