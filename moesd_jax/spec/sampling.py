"""Sampling and lossless rejection sampling.

All functions work on whole batches with per-row parameters, so one compiled program
serves rows with different settings. A row with ``temperature == 0`` is greedy: its
distribution is the one-hot of the argmax, which makes greedy decoding a special case of
rejection sampling (accept iff the draft equals the argmax; on rejection the residual is
the argmax itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_probs(logits_BV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array,
                 top_p_B: jax.Array) -> jax.Array:
    """Target distribution after temperature, top-k and top-p (float32 [B, V]).

    The vocabulary sort that top-k / top-p need (about 1 ms per 4,096-entry row on a
    CPU) runs only when some row asks for a filter (``lax.cond`` at run time, so one
    compiled program serves every mix of rows): greedy rows are a one-hot argmax and
    unfiltered rows a plain softmax, computed the same way in either branch, so a row's
    distribution never depends on the other rows of its batch.

    Args:
      logits_BV: float32 logits.
      temperature_B: float32; 0 = greedy (one-hot argmax).
      top_k_B: int32; 0 = no top-k filter.
      top_p_B: float32 in (0, 1]; 1 = no nucleus filter.
    """
    x = logits_BV.astype(jnp.float32)
    greedy_B = temperature_B <= 0.0
    filtered_B = ~greedy_B & ((top_k_B > 0) | (top_p_B < 1.0))
    x = x / jnp.where(greedy_B, 1.0, temperature_B)[:, None]
    plain = lambda x: jax.nn.softmax(x, axis=-1)  # noqa: E731
    branch = jnp.where(jnp.any(filtered_B), 2, jnp.where(jnp.all(greedy_B), 0, 1))
    probs = jax.lax.switch(branch, [
        jnp.zeros_like,  # every row greedy: only the one-hot below is used
        plain,
        lambda x: jnp.where(filtered_B[:, None], _top_k_top_p(x, top_k_B, top_p_B), plain(x)),
    ], x)
    onehot = jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), x.shape[-1], dtype=jnp.float32)
    return jnp.where(greedy_B[:, None], onehot, probs)


def _top_k_top_p(x_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """softmax of temperature-scaled logits restricted to top-k, then top-p (sorts V)."""
    v = x_BV.shape[-1]
    x = x_BV
    sorted_desc = -jnp.sort(-x, axis=-1)
    # top-k: keep logits >= the k-th largest (ties kept).
    k_idx = jnp.clip(jnp.where(top_k_B > 0, top_k_B, v) - 1, 0, v - 1)
    kth = jnp.take_along_axis(sorted_desc, k_idx[:, None], axis=-1)
    x = jnp.where(x >= kth, x, -jnp.inf)
    # top-p over the (top-k filtered) sorted distribution: keep the smallest prefix whose
    # mass reaches p; a token is kept if the mass strictly before it is < p.
    sorted_desc = jnp.where(sorted_desc >= kth, sorted_desc, -jnp.inf)
    ps = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(ps, axis=-1) - ps
    keep_sorted = before < top_p_B[:, None]
    n_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
    thresh = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    x = jnp.where(x >= thresh, x, -jnp.inf)
    return jax.nn.softmax(x, axis=-1)


def sample(key_B: jax.Array, probs_BV: jax.Array) -> jax.Array:
    """One token per row from ``probs_BV`` with per-row keys ``key_B`` (int32 [B]).

    When every row is one-hot (all greedy) the draw is its argmax, without generating
    V Gumbel variates per row; the keys are consumed the same way either way.
    """

    def draw(p):
        logp = jnp.log(jnp.maximum(p, 0.0))
        return jax.vmap(jax.random.categorical)(key_B, logp).astype(jnp.int32)

    one_hot = jnp.all(jnp.max(probs_BV, axis=-1) >= 1.0)
    return jax.lax.cond(one_hot, lambda p: jnp.argmax(p, axis=-1).astype(jnp.int32), draw,
                        probs_BV)


def rejection_sample_chain(key_B: jax.Array, drafts_BK: jax.Array, q_BKV: jax.Array,
                           p_BTV: jax.Array):
    """Lossless speculative sampling for a chain of K drafts (Leviathan et al., 2023).

    Draft ``d_j`` (drawn from q_j) is accepted with probability min(1, p_j(d_j)/q_j(d_j));
    at the first rejection the next token is drawn from norm(max(0, p_j - q_j)); if all K
    are accepted the bonus token is drawn from p_K. The committed tokens are then
    distributed exactly as the target's.

    Args:
      key_B: per-row PRNG keys.
      drafts_BK: int32 draft tokens.
      q_BKV: draft distributions the drafts were drawn from (one-hot for deterministic
        drafters such as prompt lookup or greedy drafting).
      p_BTV: target distributions at the T = K + 1 verified positions.

    Returns:
      (num_accepted_B int32 in [0, K], next_token_B int32): the row commits
      ``drafts[:num_accepted]`` followed by ``next_token``.
    """
    b, k = drafts_BK.shape
    v = p_BTV.shape[-1]
    ku, kr = jax.vmap(lambda x: tuple(jax.random.split(x)))(key_B)
    u_BK = jax.vmap(lambda x: jax.random.uniform(x, (k,)))(ku)
    p_d = jnp.take_along_axis(p_BTV[:, :k], drafts_BK[:, :, None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q_BKV, drafts_BK[:, :, None], axis=-1)[..., 0]
    ok_BK = u_BK * q_d < p_d
    n_acc = jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=1), axis=1)
    q_pad = jnp.concatenate([q_BKV, jnp.zeros((b, 1, v), q_BKV.dtype)], axis=1)
    p_a = jnp.take_along_axis(p_BTV, n_acc[:, None, None], axis=1)[:, 0]
    q_a = jnp.take_along_axis(q_pad, n_acc[:, None, None], axis=1)[:, 0]
    resid = residual(p_a, q_a)
    return n_acc.astype(jnp.int32), sample(kr, resid)


def residual(p_BV: jax.Array, q_BV: jax.Array) -> jax.Array:
    """norm(max(0, p - q)), falling back to p where p == q (the residual has no mass)."""
    r = jnp.maximum(p_BV - q_BV, 0.0)
    z = jnp.sum(r, axis=-1, keepdims=True)
    return jnp.where(z > 1e-12, r / jnp.maximum(z, 1e-30), p_BV)


def split_rows(key_B: jax.Array):
    """Splits each row's key into (carry, use)."""
    ks = jax.vmap(lambda k: jax.random.split(k))(key_B)
    return ks[:, 0], ks[:, 1]


def _sibling_rejected(p_BV, q_BV, tok_B):
    """After rejecting sibling ``tok``: the residual target norm(max(0, p - q)) and the
    draft distribution the next sibling was drawn from (q without ``tok``)."""
    q_wo = jnp.where(jnp.arange(q_BV.shape[-1])[None, :] == tok_B[:, None], 0.0, q_BV)
    z = jnp.sum(q_wo, axis=-1, keepdims=True)
    return residual(p_BV, q_BV), jnp.where(z > 0, q_wo / jnp.maximum(z, 1e-30), 0.0)


def rejection_sample_tree(tree, key_B, node_tok_BT, q_BTV, p_BTV, greedy_B, node_ok_BT=None):
    """Lossless acceptance over a static token tree (a chain is the tree of width 1).

    Greedy rows: the longest root-to-node path whose every token equals the target's
    argmax at its parent; the next token is the argmax at the last accepted node.

    Sampled rows: multi-candidate recursive rejection sampling over siblings (SpecInfer,
    Miao et al. 2023; Recursive Speculative Decoding, Jeon et al. 2024). At the current
    node with target distribution p and draft distribution q, the children c_1..c_w
    (drawn from q without replacement) are tried in rank order: c_i is accepted with
    probability min(1, p(c_i) / q(c_i)) and the walk descends into it; on rejection
    ``p <- norm(max(0, p - q))`` and ``q <- q without c_i, renormalised`` (the
    distribution the next sibling was drawn from). A deterministic proposer
    (``q_BTV=None``) proposes each sibling as a point mass: c_i is accepted with
    probability p(c_i) and rejection removes c_i from p. If every child is rejected the
    next token is drawn from the final residual p; if a leaf is accepted the bonus token
    is drawn from the target at that leaf. By induction over the siblings the emitted
    token is distributed exactly as p. For a chain this is Leviathan et al.'s rule with
    the same random numbers as :func:`rejection_sample_chain`.

    Args:
      tree: the static ``TokenTree``.
      key_B: per-row keys (split as in ``rejection_sample_chain``: the uniforms of node i
        are ``uniform(ku, (N,))[i - 1]``, the next token uses ``kr``).
      node_tok_BT: int32 [B, N+1] node tokens (root first).
      q_BTV: draft distributions at the nodes, or None (deterministic proposer).
      p_BTV: target distributions at the nodes (after temperature / top-k / top-p).
      greedy_B: rows accepting by argmax match.
      node_ok_BT: optional bool [B, N+1]: nodes a row may accept (a per-row draft limit,
        e.g. depth <= K_b). A masked node is never tried, so a node whose children are all
        masked acts as a leaf: its next token is drawn from the target there, exactly as
        at a leaf; the rule stays lossless. Must be closed under descent (a masked
        node's descendants masked too).

    Returns:
      (path_BJ int32 [B, D+1] accepted node indices, root first, padded with the last
       accepted node; num_accepted_B int32 in [0, D]; next_token_B int32).
    """
    b, t, v = p_BTV.shape
    n = tree.num_nodes
    ku, kr = jax.vmap(lambda x: tuple(jax.random.split(x)))(key_B)
    u_BN = jax.vmap(lambda x: jax.random.uniform(x, (n,)))(ku)
    u_BT = jnp.concatenate([jnp.ones((b, 1), u_BN.dtype), u_BN], axis=1)
    rows = jnp.arange(b)
    children = jnp.asarray(tree.children)
    nch = jnp.asarray(tree.num_children)
    w = int(tree.num_children.max())
    point = q_BTV is None

    def sibling(i, c):
        cur, stopped, p_cur, q_cur, amax, acc = c
        child = children[cur, i]
        tok = node_tok_BT[rows, child]
        qc = jnp.ones((b,), p_cur.dtype) if point else q_cur[rows, tok]
        pc = p_cur[rows, tok]
        live = (i < nch[cur]) & (acc < 0) & ~stopped
        if node_ok_BT is not None:
            live = live & node_ok_BT[rows, child]
        ok = live & jnp.where(greedy_B, tok == amax, (qc > 0) & (u_BT[rows, child] * qc < pc))
        rej = live & ~ok & ~greedy_B & (qc > 0)

        def update(pq):
            p_cur, q_cur = pq
            if point:
                p_new = residual(p_cur, jax.nn.one_hot(tok, v, dtype=p_cur.dtype))
                q_new = q_cur
            else:
                p_new, q_new = _sibling_rejected(p_cur, q_cur, tok)
            return (jnp.where(rej[:, None], p_new, p_cur),
                    jnp.where(rej[:, None], q_new, q_cur))

        # greedy rows never update the residual: skip the [B, V] work when none is due
        p_cur, q_cur = jax.lax.cond(jnp.any(rej), update, lambda pq: pq, (p_cur, q_cur))
        return cur, stopped, p_cur, q_cur, amax, jnp.where(ok, child, acc)

    def depth_step(carry, _):
        cur, stopped, n_acc, final = carry
        p_cur = p_BTV[rows, cur]
        q_cur = jnp.zeros((b, 1), p_cur.dtype) if point else q_BTV[rows, cur]
        init = (cur, stopped, p_cur, q_cur, jnp.argmax(p_cur, axis=-1),
                jnp.full((b,), -1, jnp.int32))
        *_, p_cur, _, _, acc = jax.lax.fori_loop(0, w, sibling, init)
        stop_now = ~stopped & (acc < 0)
        final = jnp.where(stop_now[:, None], p_cur, final)
        stopped = stopped | stop_now
        cur = jnp.where(stopped, cur, acc)
        n_acc = n_acc + (~stopped).astype(jnp.int32)
        return (cur, stopped, n_acc, final), cur

    zeros = jnp.zeros((b,), jnp.int32)
    (cur, stopped, n_acc, final), path = jax.lax.scan(
        depth_step, (zeros, jnp.zeros((b,), jnp.bool_), zeros, p_BTV[:, 0]), None,
        length=tree.depth)
    final = jnp.where(stopped[:, None], final, p_BTV[rows, cur])  # bonus: p at the leaf
    path_BJ = jnp.concatenate([zeros[:, None], path.T], axis=1)
    return path_BJ, n_acc, sample(kr, final)
