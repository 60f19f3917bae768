"""Drafters: a draft model (any dense or MoE model of the same tokenizer) and n-gram
prompt lookup (no model). Both return K draft tokens and the distributions they were
drawn from, for lossless rejection sampling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moesd_jax.kv_cache import KVCache
from moesd_jax.models.transformer import apply
from moesd_jax.spec.sampling import filter_probs, sample, split_rows


def draft_model_chain(graphdef, state, cache: KVCache, tokens_BN, seq_len_B, k: int,
                      key_B, temperature_B, top_k_B, top_p_B, active_B):
    """Draws K tokens autoregressively from the draft model.

    The draft cache is kept "lazy by one": at entry it is valid for positions
    < seq_len - 2, so the first draft forward re-feeds the last committed token together
    with the pending one (T = 2). This keeps it in sync after any acceptance (including
    all-K accepted, where the last draft token never went through the draft) with one
    static shape.

    Args:
      tokens_BN: token buffer; the pending (not yet cached) token is at seq_len - 1.
      seq_len_B: tokens in the buffer per row (>= 2).
      active_B: rows still generating (others dispatch no experts).

    Returns:
      (drafts_BK int32, q_BKV float32, updated draft cache, key_B).
    """
    b = tokens_BN.shape[0]
    pos0 = seq_len_B - 1
    idx = jnp.stack([pos0 - 1, pos0], axis=1)  # [B, 2]
    first_BT = jnp.take_along_axis(tokens_BN, idx, axis=1)
    cache = cache.replace(lengths=pos0 - 1)
    valid = jnp.broadcast_to(active_B[:, None], (b, 2))
    logits, cache, _ = apply(graphdef, state, first_BT, idx, cache, token_valid_BT=valid)
    cache = cache.replace(lengths=cache.lengths + 2)
    key_B, use = split_rows(key_B)
    q0 = filter_probs(logits[:, 1], temperature_B, top_k_B, top_p_B)
    d0 = sample(use, q0)

    def step(carry, _):
        cache, tok_B, key_B = carry
        pos = cache.lengths[:, None]
        logits, cache, _ = apply(graphdef, state, tok_B[:, None], pos, cache,
                                 token_valid_BT=active_B[:, None])
        cache = cache.replace(lengths=cache.lengths + 1)
        key_B, use = split_rows(key_B)
        q = filter_probs(logits[:, 0], temperature_B, top_k_B, top_p_B)
        d = sample(use, q)
        return (cache, d, key_B), (d, q)

    if k > 1:
        (cache, _, key_B), (ds, qs) = jax.lax.scan(step, (cache, d0, key_B), None,
                                                   length=k - 1)
        drafts = jnp.concatenate([d0[:, None], ds.T], axis=1)
        q = jnp.concatenate([q0[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)
    else:
        drafts, q = d0[:, None], q0[:, None]
    return drafts, q, cache, key_B


def ngram_chain(tokens_BN, seq_len_B, k: int, n: int, vocab: int):
    """Prompt lookup: find the most recent earlier occurrence of the last ``n`` tokens and
    propose the K tokens that followed it. Rows without a match propose the last token
    repeated (it will simply be rejected if wrong).

    Returns:
      (drafts_BK int32, q_BKV float32 one-hot: the drafter is deterministic).
    """
    b, nbuf = tokens_BN.shape
    starts = nbuf - n
    pat_idx = jnp.clip(seq_len_B[:, None] - n + jnp.arange(n)[None, :], 0, nbuf - 1)
    pattern_Bn = jnp.take_along_axis(tokens_BN, pat_idx, axis=1)
    match_BI = jnp.ones((b, starts), jnp.bool_)
    for j in range(n):
        match_BI = match_BI & (tokens_BN[:, j:starts + j] == pattern_Bn[:, j:j + 1])
    i_idx = jnp.arange(starts)[None, :]
    # the occurrence must end before the last token (strictly earlier) and n <= seq_len
    ok_BI = match_BI & (i_idx + n < seq_len_B[:, None]) & (seq_len_B[:, None] >= n)
    best = jnp.max(jnp.where(ok_BI, i_idx, -1), axis=1)
    found = best >= 0
    src = best[:, None] + n + jnp.arange(k)[None, :]
    last = jnp.take_along_axis(tokens_BN, (seq_len_B - 1)[:, None], axis=1)
    in_range = found[:, None] & (src < seq_len_B[:, None])
    drafts = jnp.where(in_range,
                       jnp.take_along_axis(tokens_BN, jnp.clip(src, 0, nbuf - 1), axis=1),
                       last)
    drafts = jnp.clip(drafts, 0, vocab - 1).astype(jnp.int32)
    return drafts, jax.nn.one_hot(drafts, vocab, dtype=jnp.float32)


def oracle_chain(ref_BN, seq_len_B, k: int, acceptance: float, key_B, vocab: int):
    """Benchmark drafter: the reference (the target's own greedy continuation) at the K
    positions after the pending token, each kept with probability ``acceptance`` and
    otherwise replaced by a token that differs from it. Costs no model call.

    Returns:
      (drafts_BK int32, q_BKV float32 one-hot, key_B).
    """
    nbuf = ref_BN.shape[1]
    src = jnp.clip(seq_len_B[:, None] + jnp.arange(k)[None, :], 0, nbuf - 1)
    right = jnp.take_along_axis(ref_BN, src, axis=1)
    key_B, use = split_rows(key_B)
    keep = jax.vmap(lambda kk: jax.random.uniform(kk, (k,)))(use) < acceptance
    drafts = jnp.where(keep, right, (right + 1) % vocab).astype(jnp.int32)
    return drafts, jax.nn.one_hot(drafts, vocab, dtype=jnp.float32), key_B
