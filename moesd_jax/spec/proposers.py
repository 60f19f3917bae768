"""Proposers: what drafts the token tree that the target verifies.

The loop's one step (``loop.step``) verifies a static :class:`~moesd_jax.spec.tree.TokenTree`
(a chain of K is the tree of width 1) and talks to the drafter only through this
contract, so every proposer works for chains and trees alike:

``hidden_layers(params) -> tuple[int, ...] | None``
    target layers whose output hidden states the proposer reads (a feature-level drafter
    such as EAGLE); the target returns them from the prefill and verify forwards it runs
    anyway, and ``init``/``commit`` get them as ``hidden`` ``[B, T, len * D]``.
``init(cfg, params, prompts_BT, pos_BT, valid_BT, prompt_len_B, capacity, ref_BM, hidden)``
    the proposer's own per-row state after the prompt (a draft model's KV cache, the
    oracle's reference rows; None for prompt lookup). Stored in
    ``DecodeState.proposer_state``; every leaf has the batch on axis 0 or 1 as the
    engine's slot insertion expects (a ``KVCache``, or ``[B, ...]`` arrays).
``propose(cfg, tree, params, s, active_B) -> Proposal``
    given the committed state ``s`` (tokens, lengths, keys, sampling parameters), the
    tree's node tokens (root = the pending token first, then the N nodes in breadth-first
    order) and the draft distributions the children of each node were drawn from
    (``q_BTV``; None for a deterministic proposer: each sibling is a point proposal).
``commit(cfg, tree, params, state, pos0_B, path_BJ, n_new_B, hidden) -> state``
    resync after acceptance: ``path_BJ`` holds the accepted node indices (root first),
    ``n_new_B`` the entries the target committed from ``pos0`` (root + accepted nodes
    when a bonus token follows), ``hidden`` the verify forward's features per node.

``params`` is the proposer's model as ``nnx.split`` pieces (or None). Proposers are
stateless singletons registered by name (``get``); a new drafter (the EAGLE head) is one
more class here, not a second copy of the loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moesd_jax.kv_cache import KVCache, compact
from moesd_jax.models.transformer import apply
from moesd_jax.spec.sampling import filter_probs, split_rows
from moesd_jax.spec.tree import TokenTree


@struct.dataclass
class Proposal:
    """A drafted tree.

    Attributes:
      tokens_BT: int32 [B, N+1] node tokens, root (the pending token) first.
      q_BTV: float32 [B, N+1, V] draft distribution at each node from which its children
        were drawn without replacement (zeros at leaves); None = deterministic proposer.
      state: the proposer's state after drafting.
      key_B: per-row keys after the proposer's draws.
      fed: tokens run through a draft model this iteration per row (static; 0 for
        model-free proposers).
    """

    tokens_BT: jax.Array
    q_BTV: jax.Array | None
    state: object
    key_B: jax.Array
    fed: int = struct.field(pytree_node=False, default=0)


# ---------------------------------------------------------------------------------------
# draft model


def _level_tables(tree: TokenTree):
    """Static per-level tables for drafting, padded so every level has the same shape.

    Returns numpy int32 arrays with a leading axis over depths d = 0..D-1:
      parents [D, P]: nodes of depth d that have children (N+1 = padding),
      kids [D, C]: their children, in BFS order (N+1 = padding),
      kid_parent [D, C]: the child's parent as an index into ``parents[d]``,
      kid_rank [D, C]: the child's rank.
    """
    n = tree.num_nodes
    levels = []
    for d in range(tree.depth):
        par = [int(i) for i in tree.nodes_at(d) if tree.num_children[i] > 0]
        kids = [int(c) for p in par for c in tree.children[p, : tree.num_children[p]]]
        local = {p: j for j, p in enumerate(par)}
        levels.append((par, kids, [local[int(tree.parents[c])] for c in kids],
                       [int(tree.ranks[c]) for c in kids]))
    pm = max(len(x[0]) for x in levels)
    cm = max(len(x[1]) for x in levels)
    pad = lambda xs, m, v: [list(x) + [v] * (m - len(x)) for x in xs]  # noqa: E731
    return (np.asarray(pad([x[0] for x in levels], pm, n + 1), np.int32),
            np.asarray(pad([x[1] for x in levels], cm, n + 1), np.int32),
            np.asarray(pad([x[2] for x in levels], cm, 0), np.int32),
            np.asarray(pad([x[3] for x in levels], cm, 0), np.int32))


def draft_tokens_fed(tree: TokenTree) -> int:
    """Tokens the draft model runs per iteration for ``tree``: 2 for the first forward
    (the last committed token, re-fed, and the root) plus, for each deeper level, that
    level's nodes that have children, padded to the widest level (one compiled level
    forward). Never more than N + 1; leaves are never fed."""
    parents = _level_tables(tree)[0]
    return 2 + (tree.depth - 1) * parents.shape[1]


def _expand(par_logits_BPV, node_tok, q_all, parents_P, kids_C, kid_parent_C, kid_rank_C,
            w: int, temperature_B, top_k_B, top_p_B, use_B):
    """Draws the children of one level's parents and stores tokens and q by node index.

    Children are the top-w draft logits (greedy rows) or w draws without replacement from
    q (Gumbel-top-w, Kool et al. 2019; for w = 1 this is ``jax.random.categorical(use,
    log q)`` exactly). Padded entries (index N+1) are dropped.
    """
    b, npar, v = par_logits_BPV.shape
    q = filter_probs(par_logits_BPV.reshape(b * npar, v), jnp.repeat(temperature_B, npar),
                     jnp.repeat(top_k_B, npar), jnp.repeat(top_p_B, npar)).reshape(b, npar, v)
    greedy_B = temperature_B <= 0.0

    def perturbed(logits):  # Gumbel noise only when some row samples
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (npar, v)))(use_B)
        return jnp.where(greedy_B[:, None, None], logits, jnp.log(jnp.maximum(q, 0.0)) + gumbel)

    score = jax.lax.cond(jnp.all(greedy_B), lambda x: x, perturbed, par_logits_BPV)
    _, top_BPW = jax.lax.top_k(score, w)
    toks = top_BPW[:, kid_parent_C, kid_rank_C].astype(jnp.int32)  # [B, C]
    node_tok = node_tok.at[:, kids_C].set(toks, mode="drop")
    q_all = q_all.at[:, parents_P].set(q, mode="drop")
    return node_tok, q_all


def draft_model_tree(tree: TokenTree, graphdef, state, cache: KVCache, tokens_BM, seq_len_B,
                     key_B, temperature_B, top_k_B, top_p_B, active_B, plan=None):
    """Drafts a static tree with the draft model in D forwards (one per depth level).

    The draft cache is "lazy by one": valid for positions < seq_len - 2 at entry, so the
    first forward re-feeds the last committed token with the pending root (T = 2); this
    keeps it in sync after any acceptance (including a fully accepted leaf, which never
    went through the draft) with one static shape. It gives the root's children. Each
    deeper level d feeds only its own nodes that have children, at positions
    ``pos0 + depth`` and written at their node slots ``pos0 + node``; the attention sees
    the committed prefix and, among the uncommitted tree slots, exactly the node's
    ancestors (written by earlier levels) and itself. Levels d = 1..D-1 share one padded
    shape and run as one ``lax.scan`` body; padding entries dispatch to no expert and
    write the slot of the last node, a leaf that nothing reads. Leaves are never fed.

    Returns:
      (node_tok_BT int32 [B, N+1] (root = pending token), q_BTV float32 [B, N+1, V] draft
       distribution at each node with children (zeros at leaves), draft cache, key_B).
    """
    b = tokens_BM.shape[0]
    n = tree.num_nodes
    pos0 = seq_len_B - 1
    idx = jnp.stack([pos0 - 1, pos0], axis=1)
    first_BT = jnp.take_along_axis(tokens_BM, idx, axis=1)
    cache = cache.replace(lengths=pos0 - 1)
    valid = jnp.broadcast_to(active_B[:, None], (b, 2))
    logits, cache, _ = apply(graphdef, state, first_BT, idx, cache, token_valid_BT=valid,
                             plan=plan)
    v = logits.shape[-1]
    parents, kids, kid_parent, kid_rank = _level_tables(tree)
    w = int(tree.num_children.max())
    samp = (temperature_B, top_k_B, top_p_B)
    node_tok = jnp.zeros((b, n + 1), jnp.int32).at[:, 0].set(first_BT[:, 1])
    q_all = jnp.zeros((b, n + 1, v), jnp.float32)
    key_B, use = split_rows(key_B)
    # the root level: its parent list is [0] padded; only the first entry is real
    root_logits = jnp.broadcast_to(logits[:, 1:2], (b, parents.shape[1], v))
    node_tok, q_all = _expand(root_logits, node_tok, q_all, parents[0], kids[0],
                              kid_parent[0], kid_rank[0], w, *samp, use)
    if tree.depth == 1:
        return node_tok, q_all, cache, key_B

    feed = parents[1:]  # [D-1, P] nodes fed per level (N+1 = padding)
    real = feed <= n
    feed = np.where(real, feed, n)  # padding -> the last node: a leaf, never read
    masks = tree.ancestor_mask[feed][:, :, 1:]  # [D-1, P, N] region = node slots 1..N
    depths = jnp.asarray(tree.depths)
    lengths = pos0 + 1  # committed through the root; node i lives at slot pos0 + i

    def level(carry, xs):
        cache, node_tok, q_all, key_B = carry
        feed_P, real_P, mask_PN, par_P, kids_C, kp_C, kr_C = xs
        fed = active_B[:, None] & real_P[None, :]
        logits, cache, _ = apply(graphdef, state, node_tok[:, feed_P],
                                 pos0[:, None] + depths[feed_P][None, :],
                                 cache.replace(lengths=lengths), tree_mask=mask_PN,
                                 token_valid_BT=fed, write_offsets_T=feed_P - 1, plan=plan)
        key_B, use = split_rows(key_B)
        node_tok, q_all = _expand(logits, node_tok, q_all, par_P, kids_C, kp_C, kr_C, w,
                                  *samp, use)
        return (cache, node_tok, q_all, key_B), None

    xs = tuple(jnp.asarray(x) for x in (feed, real, masks, parents[1:], kids[1:],
                                         kid_parent[1:], kid_rank[1:]))
    (cache, node_tok, q_all, key_B), _ = jax.lax.scan(level, (cache, node_tok, q_all, key_B),
                                                      xs)
    return node_tok, q_all, cache, key_B


class Proposer:
    """Base: no target features, no state, nothing to resync."""

    name = ""

    def hidden_layers(self, params):
        return None

    def init(self, cfg, params, prompts_BT, pos_BT, valid_BT, prompt_len_B, capacity,
             ref_BM=None, hidden=None):
        return None

    def propose(self, cfg, tree: TokenTree, params, s, active_B) -> Proposal:
        raise NotImplementedError

    def commit(self, cfg, tree: TokenTree, params, state, pos0_B, path_BJ, n_new_B,
               hidden=None):
        return state

    def catch_up(self, cfg, params, state, s, sync_B, window: int):
        """Brings the state up to date with tokens committed while the proposer did not
        run (plain-decoding iterations of utility-driven K; ``sync_B``: each row's
        ``seq_len`` when it last drafted; at most ``window`` tokens behind)."""
        return state


class DraftModel(Proposer):
    """A separate draft model (dense or MoE) sharing the target's tokenizer."""

    name = "draft"

    def init(self, cfg, params, prompts_BT, pos_BT, valid_BT, prompt_len_B, capacity,
             ref_BM=None, hidden=None):
        dg, ds = params
        mc = model_cfg(dg, ds)
        cache = KVCache.init(mc.num_layers, prompts_BT.shape[0], capacity, mc.num_kv_heads,
                             mc.dh, jnp.dtype(mc.compute_dtype))
        _, cache, _ = apply(dg, ds, prompts_BT, pos_BT, cache, token_valid_BT=valid_BT,
                            plan=cfg.plan)
        return cache.replace(lengths=prompt_len_B)

    def propose(self, cfg, tree: TokenTree, params, s, active_B) -> Proposal:
        dg, ds = params
        tok, q, cache, key_B = draft_model_tree(tree, dg, ds, s.proposer_state, s.tokens_BM,
                                                s.seq_len_B, s.key_B, s.temperature_B,
                                                s.top_k_B, s.top_p_B, active_B, cfg.plan)
        return Proposal(tok, q, cache, key_B, fed=draft_tokens_fed(tree))

    def commit(self, cfg, tree: TokenTree, params, state, pos0_B, path_BJ, n_new_B,
               hidden=None):
        if tree.is_chain:  # the accepted drafts already sit at contiguous slots
            return state
        # the cache must be valid below the next pos0 - 1 = pos0 + n_acc: the root and the
        # accepted non-leaf nodes, which the level forwards left at their node slots (the
        # last accepted node is re-fed next iteration, "lazy by one")
        return compact(state.replace(lengths=pos0_B), path_BJ, jnp.zeros_like(n_new_B))

    def catch_up(self, cfg, params, state, s, sync_B, window: int, chunk: int = 16):
        """Re-feeds the committed tokens each row decoded without drafting, from its
        ``sync_B - 2`` (the lazy cache's valid range when it last drafted; at most
        ``window`` back) up to ``seq_len - 2``, in ``chunk``-token forwards: as many as
        the most-lagging row needs (a run-time trip count), so the cost follows the lag
        rather than the largest possible one. Slots re-fed twice get identical K/V."""
        dg, ds = params
        end = jnp.maximum(s.seq_len_B - 2, 0)
        start = jnp.clip(sync_B - 2, jnp.maximum(end - window, 0), end)
        start = jnp.where(s.done_B, end, start)
        n_chunks = (jnp.max(end - start) + chunk - 1) // chunk
        ar = jnp.arange(chunk, dtype=jnp.int32)[None, :]

        def body(carry):
            i, cache = carry
            lo = start + i * chunk
            pos = lo[:, None] + ar
            valid = pos < end[:, None]
            tok = jnp.take_along_axis(s.tokens_BM,
                                      jnp.clip(pos, 0, s.tokens_BM.shape[1] - 1), axis=1)
            _, cache, _ = apply(dg, ds, tok, pos, cache.replace(lengths=jnp.minimum(lo, end)),
                                token_valid_BT=valid, plan=cfg.plan)
            return i + 1, cache

        _, cache = jax.lax.while_loop(lambda c: c[0] < n_chunks, body,
                                      (jnp.zeros((), jnp.int32), state))
        return cache.replace(lengths=end)


def model_cfg(graphdef, state):
    """The ModelConfig of a model held as ``nnx.split`` pieces (the loop's and the
    draft model's caches are sized from it)."""
    from flax import nnx

    return nnx.merge(graphdef, state).cfg


# ---------------------------------------------------------------------------------------
# prompt lookup


def ngram_tree(tree: TokenTree, tokens_BM, seq_len_B, n: int, vocab: int):
    """Prompt lookup over a tree: the continuations of the most recent earlier
    occurrences of the last ``n`` tokens, merged into a trie, fill the tree by rank.

    Candidates are the up to M = (number of leaves) most recent matches, newest first;
    a node with path (r_1, .., r_d) takes the r_d-th distinct token (in candidate order)
    at depth d among the candidates that agree with its parent's tokens. So the rank-0
    spine follows the newest match (a chain of K is the usual prompt lookup), and
    siblings are the other matches' different continuations. A node with no such
    candidate (no match, a match too close to the end, fewer distinct continuations than
    siblings) proposes the pending token (the verifier simply rejects it if wrong).

    Returns:
      int32 [B, N+1] node tokens, root = the pending token.
    """
    b, nbuf = tokens_BM.shape
    starts = nbuf - n
    depth = tree.depth
    m = max(1, int(np.sum(tree.num_children == 0)))
    pat_idx = jnp.clip(seq_len_B[:, None] - n + jnp.arange(n)[None, :], 0, nbuf - 1)
    pattern_Bn = jnp.take_along_axis(tokens_BM, pat_idx, axis=1)
    match_BI = jnp.ones((b, starts), jnp.bool_)
    for j in range(n):
        match_BI = match_BI & (tokens_BM[:, j:starts + j] == pattern_Bn[:, j:j + 1])
    i_idx = jnp.arange(starts)[None, :]
    # the occurrence must end before the last token (strictly earlier) and n <= seq_len
    ok_BI = match_BI & (i_idx + n < seq_len_B[:, None]) & (seq_len_B[:, None] >= n)
    best_BM, _ = jax.lax.top_k(jnp.where(ok_BI, i_idx, -1), min(m, starts))
    src = best_BM[:, :, None] + n + jnp.arange(depth)[None, None, :]  # [B, M, D]
    ok = (best_BM[:, :, None] >= 0) & (src < seq_len_B[:, None, None])
    flat = jnp.take_along_axis(tokens_BM, jnp.clip(src, 0, nbuf - 1).reshape(b, -1), axis=1)
    cont_BMD = jnp.where(ok, flat.reshape(src.shape), -1)
    pending = jnp.take_along_axis(tokens_BM, (seq_len_B - 1)[:, None], axis=1)[:, 0]
    mm = cont_BMD.shape[1]
    earlier = jnp.tril(jnp.ones((mm, mm), jnp.bool_), -1)  # [m, m']: m' < m
    cand = {0: jnp.ones((b, mm), jnp.bool_)}
    toks = [pending]
    for i in range(1, tree.num_nodes + 1):
        par, d, r = int(tree.parents[i]), int(tree.depths[i]), int(tree.ranks[i])
        val = cont_BMD[:, :, d - 1]
        c = cand[par] & (val >= 0)
        same = (val[:, :, None] == val[:, None, :]) & c[:, None, :] & earlier[None]
        first = c & ~jnp.any(same, axis=2)
        pick = first & (jnp.cumsum(first, axis=1) - 1 == r)
        has = jnp.any(pick, axis=1)
        tok = jnp.where(has, jnp.sum(jnp.where(pick, val, 0), axis=1), pending)
        cand[i] = c & (val == tok[:, None]) & has[:, None]
        toks.append(tok)
    return jnp.clip(jnp.stack(toks, axis=1), 0, vocab - 1).astype(jnp.int32)


class PromptLookup(Proposer):
    """n-gram prompt lookup (no model): deterministic, so ``q`` is None."""

    name = "ngram"

    def propose(self, cfg, tree: TokenTree, params, s, active_B) -> Proposal:
        tok = ngram_tree(tree, s.tokens_BM, s.seq_len_B, cfg.ngram_n, cfg.vocab)
        return Proposal(tok, None, None, s.key_B)


# ---------------------------------------------------------------------------------------
# oracle (benchmarks)


class Oracle(Proposer):
    """Benchmark proposer: the reference continuation (the target's own greedy output),
    each rank-0 ("spine") node kept with probability ``cfg.oracle_acceptance`` and
    otherwise replaced by a token that differs from it; other siblings propose tokens
    that differ from the reference too. Costs no model call: isolates the system effect
    of verification."""

    name = "oracle"

    def init(self, cfg, params, prompts_BT, pos_BT, valid_BT, prompt_len_B, capacity,
             ref_BM=None, hidden=None):
        if ref_BM is None:
            raise ValueError("spec method 'oracle' needs the reference tokens")
        b = prompts_BT.shape[0]
        return jnp.zeros((b, capacity), jnp.int32).at[:, :ref_BM.shape[1]].set(ref_BM)

    def propose(self, cfg, tree: TokenTree, params, s, active_B) -> Proposal:
        ref_BM = s.proposer_state
        nbuf = ref_BM.shape[1]
        depths = np.asarray(tree.depths[1:])
        spine = np.asarray([set(p) == {0} for p in tree.paths])
        src = jnp.clip(s.seq_len_B[:, None] + jnp.asarray(depths - 1)[None, :], 0, nbuf - 1)
        right = jnp.take_along_axis(ref_BM, src, axis=1)  # [B, N]
        key_B, use = split_rows(s.key_B)
        keep = jax.vmap(lambda kk: jax.random.uniform(kk, (tree.num_nodes,)))(use)
        keep = (keep < cfg.oracle_acceptance) & jnp.asarray(spine)[None, :]
        wrong = (right + 1 + jnp.asarray(tree.ranks[1:])[None, :]) % cfg.vocab
        nodes = jnp.where(keep, right, wrong).astype(jnp.int32)
        root = jnp.take_along_axis(s.tokens_BM, (s.seq_len_B - 1)[:, None], axis=1)
        return Proposal(jnp.concatenate([root, nodes], axis=1), None, ref_BM, key_B)


_PROPOSERS = {p.name: p for p in (DraftModel(), PromptLookup(), Oracle())}


def get(method: str):
    """The proposer for ``SpecConfig.method`` (``draft``, ``ngram``, ``oracle``)."""
    if method == "eagle": __import__("moesd_jax.spec.eagle")  # noqa: E701 (registers "eagle")
    try:
        return _PROPOSERS[method]
    except KeyError:
        raise ValueError(f"no proposer for spec method {method!r}; known: "
                         f"{sorted(_PROPOSERS)}") from None


def register(proposer: Proposer) -> None:
    """Adds (or replaces) a proposer under ``proposer.name``."""
    _PROPOSERS[proposer.name] = proposer


__all__ = ["Proposal", "Proposer", "DraftModel", "PromptLookup", "Oracle", "get", "register",
           "draft_model_tree", "draft_tokens_fed", "ngram_tree"]
