"""Static token trees: topology, tree drafting with a draft model, lossless tree acceptance.

Topology
--------
A tree is a static, hashable tuple of *paths*, vLLM's ``speculative_token_tree``
convention: a path lists child ranks from the root, so ``(0,)`` is the root's top
candidate, ``(1,)`` its second, ``(0, 1)`` the second candidate after ``(0,)``. Node 0 is
the root, the *pending* token (sampled last iteration, not yet run through the target);
the N draft nodes are numbered 1..N in breadth-first order (depth, then path), so every
depth level is a contiguous index range and parents precede children. A chain of K is
``((0,), (0, 0), ..., (0,) * K)``. :class:`TokenTree` derives numpy constants from the
paths: parents, depths (= position offsets), child ranks, children, the ancestor-or-self
mask ``[N+1, N+1]`` and the root-to-leaf paths.

Named trees live in ``configs/spec/tree-*.yaml`` (``paths: [[0], [1], [0, 0], ...]`` or
``widths: [w_1, w_2, ...]``, a full tree where every node at depth d-1 has w_d children);
:func:`load_tree` resolves ``tree-15`` or any YAML path.

Drafting (:func:`draft_model_tree`)
-----------------------------------
One draft forward per depth level (D forwards for a tree of depth D, like K forwards for a
chain of K). The children of a node are the top-w tokens of the draft distribution q at
that node (greedy rows: top-w draft logits), w = its number of children. Sampled rows draw
the children **without replacement** from q (Gumbel-top-w, Kool et al. 2019), which is
what makes the sibling residual update below exact. For w = 1 this is exactly
``jax.random.categorical`` with the same key, so a chain-shaped tree reproduces the chain
drafter's samples.

The model's attention treats every cache entry before ``cache.lengths`` as visible and
takes a tree mask only among the T new tokens, so a level's nodes cannot attend to
earlier levels' nodes written by an earlier forward. Each level forward therefore
re-feeds the breadth-first prefix of nodes 1..m (m = the last node that has children)
with the ancestor mask; nodes not drafted yet are placeholders that no real node
attends to and that dispatch to no expert. All levels then share one shape, so they run
as one ``lax.scan`` body (one compiled draft forward whatever the depth), and the last
level leaves every non-leaf node's draft K/V at its breadth-first cache slot
``pos0 + node``, the target's verify layout. Leaves never need draft K/V: a leaf is only
ever the last accepted node, which the next iteration re-feeds ("lazy by one", see
``drafters.draft_model_chain``). Cost: (D-1) * m draft tokens per iteration instead of N
(an attention that accepted a mask over earlier uncommitted cache entries would let each
level feed only its own nodes). The prompt-lookup drafter stays chain-only.

Acceptance (:func:`rejection_sample_tree`)
------------------------------------------
Greedy rows: the longest root-to-node path whose every token equals the target's argmax
at its parent; the next token is the argmax at the last accepted node.

Sampled rows: multi-candidate recursive rejection sampling over siblings (SpecInfer's
multi-step speculative sampling, Miao et al. 2023; recursive rejection sampling without
replacement, Jeon et al. 2024, "Recursive Speculative Decoding"). At the current node
with target distribution p and draft distribution q, the children c_1..c_w (drawn from q
without replacement) are tried in rank order: c_i is accepted with probability
min(1, p(c_i) / q(c_i)) and the walk descends into it; on rejection
``p <- norm(max(0, p - q))`` (the rejected draft's mass is subtracted) and
``q <- q with c_i removed, renormalised`` (the distribution the next sibling was actually
drawn from). If every child is rejected the next token is drawn from the final residual
p; if a leaf is accepted the bonus token is drawn from the target at that leaf. By
induction over the siblings the emitted token is distributed exactly as p, so the
generated sequence has exactly the target's distribution.

Commit (``loop._tree_step``): ``kv_cache.compact`` moves the accepted path's K/V (target
and draft caches, per row) to contiguous positions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from moesd_jax.config import ConfigError, resolve_config_path
from moesd_jax.kv_cache import KVCache
from moesd_jax.models.transformer import apply
from moesd_jax.spec.sampling import filter_probs, residual, sample, split_rows

Paths = tuple[tuple[int, ...], ...]


def _const(x) -> np.ndarray:
    a = np.asarray(x)
    a.setflags(write=False)
    return a


def validate_paths(paths) -> Paths:
    """Checks a list of paths and returns them as a tuple of int tuples in BFS order.

    Raises:
      ConfigError: empty tree, empty/negative path, duplicate path, missing parent, or
        child ranks that are not 0..n-1 under some node.
    """
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise ConfigError(f"tree paths must be a list of lists of ints, got {paths!r}")
    out = []
    for i, p in enumerate(paths):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
            raise ConfigError(f"tree path {i} = {p!r} must be a non-empty list of child "
                              "ranks (the root is implicit)")
        try:
            t = tuple(int(r) for r in p)
        except (TypeError, ValueError):
            raise ConfigError(f"tree path {i} = {p!r} must hold integer ranks") from None
        if any(int(r) != r for r in p) or min(t) < 0:
            raise ConfigError(f"tree path {i} = {list(p)!r} has a negative or non-integer "
                              "rank")
        out.append(t)
    if not out:
        raise ConfigError("a tree needs at least one node")
    seen = set()
    for t in out:
        if t in seen:
            raise ConfigError(f"tree path {list(t)} appears more than once")
        seen.add(t)
    children: dict[tuple[int, ...], list[int]] = {(): []}
    for t in out:
        children.setdefault(t, [])
    for t in out:
        if t[:-1] not in seen and len(t) > 1:
            raise ConfigError(f"tree path {list(t)} has no parent: {list(t[:-1])} is not in "
                              "the tree")
        children[t[:-1]].append(t[-1])
    for parent, ranks in children.items():
        if sorted(ranks) != list(range(len(ranks))):
            missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
            raise ConfigError(f"children of {list(parent) or 'the root'} have ranks "
                              f"{sorted(ranks)}: ranks must be 0..n-1 (missing {missing})")
    return tuple(sorted(out, key=lambda t: (len(t), t)))


def paths_from_widths(widths: Sequence[int]) -> Paths:
    """Full tree: every node at depth d-1 has ``widths[d-1]`` children (root = depth 0).

    ``[1, 1, 1, 1]`` is a chain of 4; ``[3, 2, 1]`` has 3 + 6 + 6 = 15 nodes.
    """
    widths = list(widths)
    if not widths or any(int(w) != w or w < 1 for w in widths):
        raise ConfigError(f"tree widths={widths} must be a non-empty list of ints >= 1")
    level: list[tuple[int, ...]] = [()]
    paths: list[tuple[int, ...]] = []
    for w in widths:
        level = [p + (r,) for p in level for r in range(int(w))]
        paths.extend(level)
    return tuple(paths)


def chain_paths(k: int) -> Paths:
    """A chain of K drafts as a tree."""
    if k < 1:
        raise ConfigError(f"a chain tree needs k >= 1, got {k}")
    return tuple((0,) * d for d in range(1, k + 1))


def paths_from_rank_acceptance(rank_probs: Sequence[float], num_nodes: int,
                               max_depth: int | None = None) -> Paths:
    """The ``num_nodes`` nodes with the highest expected acceptance under a rank model.

    A node's score is the product over its path of ``rank_probs[rank]`` (the probability
    that the draft's rank-r candidate is the accepted one); the best ``num_nodes`` nodes
    (ties broken breadth-first) form a valid tree when ``rank_probs`` is strictly
    decreasing and < 1. This is how Medusa / EAGLE / Sequoia-style static trees are built
    from measured per-rank acceptance rates.
    """
    a = [float(x) for x in rank_probs]
    if not a or any(not 0 < x < 1 for x in a) or any(x <= y for x, y in zip(a, a[1:])):
        raise ConfigError(f"rank_probs={a} must be strictly decreasing values in (0, 1)")
    depth_cap = max_depth or num_nodes
    import heapq

    heap = [(-a[0], (0,))]
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < num_nodes:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        r = path[-1]
        if r + 1 < len(a):  # next sibling
            heapq.heappush(heap, (neg / a[r] * a[r + 1], path[:-1] + (r + 1,)))
        if len(path) < depth_cap:  # first child
            heapq.heappush(heap, (neg * a[0], path + (0,)))
    return validate_paths(chosen)


@dataclasses.dataclass(frozen=True)
class TokenTree:
    """Static tree topology (hashable) and its derived numpy constants.

    Build with ``TokenTree.from_paths(paths)`` (cached); node 0 is the root (pending
    token), nodes 1..N the drafts in breadth-first order.

    Attributes (numpy, read-only):
      parents: int32 [N+1], parent node index (-1 for the root).
      depths: int32 [N+1], depth = position offset from the root.
      ranks: int32 [N+1], child rank under the parent (0 for the root).
      num_children: int32 [N+1].
      children: int32 [N+1, W] child node indices by rank, 0-padded (W = max children).
      ancestor_mask: bool [N+1, N+1], ``[i, j]`` = j is an ancestor of i or i itself.
      leaf_paths: int32 [num_leaves, D+1], root-to-leaf node indices, -1 padded.
      level_start: int32 [D+2], nodes of depth d are ``level_start[d]:level_start[d+1]``.
    """

    paths: Paths
    parents: np.ndarray = dataclasses.field(init=False, compare=False, hash=False, repr=False)
    depths: np.ndarray = dataclasses.field(init=False, compare=False, hash=False, repr=False)
    ranks: np.ndarray = dataclasses.field(init=False, compare=False, hash=False, repr=False)
    num_children: np.ndarray = dataclasses.field(init=False, compare=False, hash=False,
                                                 repr=False)
    children: np.ndarray = dataclasses.field(init=False, compare=False, hash=False,
                                             repr=False)
    ancestor_mask: np.ndarray = dataclasses.field(init=False, compare=False, hash=False,
                                                  repr=False)
    leaf_paths: np.ndarray = dataclasses.field(init=False, compare=False, hash=False,
                                               repr=False)
    level_start: np.ndarray = dataclasses.field(init=False, compare=False, hash=False,
                                                repr=False)

    def __post_init__(self):
        paths = validate_paths(self.paths)
        object.__setattr__(self, "paths", paths)
        n = len(paths)
        index = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
        parents = np.full(n + 1, -1, np.int32)
        depths = np.zeros(n + 1, np.int32)
        ranks = np.zeros(n + 1, np.int32)
        nch = np.zeros(n + 1, np.int32)
        for p, i in index.items():
            if i:
                parents[i] = index[p[:-1]]
                depths[i] = len(p)
                ranks[i] = p[-1]
                nch[parents[i]] += 1
        w = int(nch.max())
        children = np.zeros((n + 1, w), np.int32)
        for i in range(1, n + 1):
            children[parents[i], ranks[i]] = i
        anc = np.zeros((n + 1, n + 1), bool)
        for i in range(n + 1):
            j = i
            while j >= 0:
                anc[i, j] = True
                j = parents[j]
        d = int(depths.max())
        leaves = [i for i in range(n + 1) if nch[i] == 0]
        leaf_paths = np.full((len(leaves), d + 1), -1, np.int32)
        for r, leaf in enumerate(leaves):
            chain = np.flatnonzero(anc[leaf])  # ancestors in BFS order = root first
            leaf_paths[r, : len(chain)] = chain
        level_start = np.searchsorted(depths, np.arange(d + 2)).astype(np.int32)
        for name, val in [("parents", parents), ("depths", depths), ("ranks", ranks),
                          ("num_children", nch), ("children", children),
                          ("ancestor_mask", anc), ("leaf_paths", leaf_paths),
                          ("level_start", level_start)]:
            object.__setattr__(self, name, _const(val))

    @staticmethod
    def from_paths(paths) -> TokenTree:
        """The (cached) tree of ``paths``, any order, lists or tuples."""
        try:
            key = tuple(tuple(int(r) for r in p) for p in paths)
        except (TypeError, ValueError):
            return TokenTree(paths)  # validate_paths raises a clear error
        return _cached_tree(key)

    @property
    def num_nodes(self) -> int:
        """N draft nodes (the root excluded)."""
        return len(self.paths)

    @property
    def depth(self) -> int:
        """D, the longest root-to-leaf path (max tokens accepted per iteration)."""
        return int(self.depths.max())

    @property
    def is_chain(self) -> bool:
        return self.paths == chain_paths(self.num_nodes)

    def nodes_at(self, d: int) -> np.ndarray:
        return np.arange(self.level_start[d], self.level_start[d + 1], dtype=np.int32)

    def feed_prefix(self, d: int) -> int:
        """The last node of depth d that has children (BFS index); the draft's level
        forwards feed nodes 1..feed_prefix(D-1), every node that has children."""
        nodes = [i for i in self.nodes_at(d) if self.num_children[i] > 0]
        return int(max(nodes))


@functools.lru_cache(maxsize=64)
def _cached_tree(paths: Paths) -> TokenTree:
    return TokenTree(paths)


def load_tree(name_or_path: str | Path | Sequence | TokenTree) -> TokenTree:
    """``tree-15`` -> ``configs/spec/tree-15.yaml``; a YAML path; a TokenTree or paths.

    A YAML tree holds ``paths: [[0], [1], [0, 0], ...]`` or ``widths: [...]``.
    """
    if isinstance(name_or_path, TokenTree):
        return name_or_path
    if not isinstance(name_or_path, (str, Path)):
        return TokenTree.from_paths(validate_paths(name_or_path))
    path = resolve_config_path(name_or_path, "spec")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or ("paths" in data) == ("widths" in data):
        raise ConfigError(f"{path}: a tree file needs exactly one of 'paths' or 'widths'")
    unknown = set(data) - {"paths", "widths", "name", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (expected paths or "
                          "widths)")
    try:
        paths = (validate_paths(data["paths"]) if "paths" in data
                 else paths_from_widths(data["widths"]))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return TokenTree.from_paths(paths)


# ---------------------------------------------------------------------------------------
# drafting


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
    pad = lambda xs, m, v: [list(x) + [v] * (m - len(x)) for x in xs]
    return (np.asarray(pad([x[0] for x in levels], pm, n + 1), np.int32),
            np.asarray(pad([x[1] for x in levels], cm, n + 1), np.int32),
            np.asarray(pad([x[2] for x in levels], cm, 0), np.int32),
            np.asarray(pad([x[3] for x in levels], cm, 0), np.int32))


def _expand(par_logits_BPV, node_tok, q_all, parents_P, kids_C, kid_parent_C, kid_rank_C,
            w: int, temperature_B, top_k_B, top_p_B, use_B):
    """Draws the children of one level's parents and stores tokens and q by node index.

    Children are the top-w draft logits (greedy rows) or w draws without replacement from
    q (Gumbel-top-w; for one parent and w = 1 this is ``jax.random.categorical(use, log
    q)`` exactly, as in the chain drafter). Padded entries (index N+1) are dropped.
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


def draft_model_tree(tree: TokenTree, graphdef, state, cache: KVCache, tokens_BN, seq_len_B,
                     key_B, temperature_B, top_k_B, top_p_B, active_B):
    """Drafts a static tree with the draft model in D forwards (one per depth level).

    The draft cache is "lazy by one" as in ``drafters.draft_model_chain``: valid for
    positions < seq_len - 2 at entry; the first forward re-feeds the last committed token
    and the pending root (T = 2) and gives the root's children. Levels d = 1..D-1 run as
    one ``lax.scan`` body (one compiled draft forward whatever the depth): each feeds the
    static prefix of nodes 1..m (every node with children; m = ``feed_prefix(D-1)``) at
    positions ``pos0 + depth`` with the ancestor mask, written at their BFS slots
    ``pos0 + node``. Nodes deeper than d hold placeholders then: nothing they feed reaches
    a node of depth <= d (the mask), they dispatch to no expert, and the next level
    overwrites their K/V.

    Returns:
      (node_tok_BT int32 [B, N+1] (root = pending token), q_BTV float32 [B, N+1, V] draft
       distribution at each node with children (zeros at leaves), draft cache, key_B).
    """
    b = tokens_BN.shape[0]
    n = tree.num_nodes
    pos0 = seq_len_B - 1
    idx = jnp.stack([pos0 - 1, pos0], axis=1)
    first_BT = jnp.take_along_axis(tokens_BN, idx, axis=1)
    cache = cache.replace(lengths=pos0 - 1)
    valid = jnp.broadcast_to(active_B[:, None], (b, 2))
    logits, cache, _ = apply(graphdef, state, first_BT, idx, cache, token_valid_BT=valid)
    v = logits.shape[-1]
    parents, kids, kid_parent, kid_rank = _level_tables(tree)
    w = int(tree.num_children.max())
    samp = (temperature_B, top_k_B, top_p_B)
    node_tok = jnp.zeros((b, n + 1), jnp.int32).at[:, 0].set(first_BT[:, 1])
    q_all = jnp.zeros((b, n + 1, v), jnp.float32)
    key_B, use = split_rows(key_B)
    # the root level: its parent list is [0] padded; only the first row is real
    root_logits = jnp.broadcast_to(logits[:, 1:2], (b, parents.shape[1], v))
    node_tok, q_all = _expand(root_logits, node_tok, q_all, parents[0], kids[0],
                              kid_parent[0], kid_rank[0], w, *samp, use)
    if tree.depth == 1:
        return node_tok, q_all, cache, key_B

    m = tree.feed_prefix(tree.depth - 1)
    sl = slice(1, m + 1)
    pos_BT = pos0[:, None] + jnp.asarray(tree.depths[sl])[None, :]
    mask = jnp.asarray(tree.ancestor_mask[sl, sl])
    depth_M = jnp.asarray(tree.depths[sl])

    def level(carry, xs):
        cache, node_tok, q_all, key_B = carry
        d, par_P, kids_C, kp_C, kr_C = xs
        fed = jnp.broadcast_to(active_B[:, None], (b, m)) & (depth_M <= d)[None, :]
        logits, cache, _ = apply(graphdef, state, node_tok[:, sl], pos_BT,
                                 cache.replace(lengths=pos0 + 1), tree_mask=mask,
                                 token_valid_BT=fed)
        par_logits = jnp.take(logits, jnp.clip(par_P - 1, 0, m - 1), axis=1)
        key_B, use = split_rows(key_B)
        node_tok, q_all = _expand(par_logits, node_tok, q_all, par_P, kids_C, kp_C, kr_C, w,
                                  *samp, use)
        return (cache, node_tok, q_all, key_B), None

    xs = (jnp.arange(1, tree.depth, dtype=jnp.int32), jnp.asarray(parents[1:]),
          jnp.asarray(kids[1:]), jnp.asarray(kid_parent[1:]), jnp.asarray(kid_rank[1:]))
    (cache, node_tok, q_all, key_B), _ = jax.lax.scan(level, (cache, node_tok, q_all, key_B),
                                                      xs)
    return node_tok, q_all, cache, key_B


# ---------------------------------------------------------------------------------------
# acceptance


def _sibling_rejected(p_BV, q_BV, tok_B):
    """After rejecting sibling ``tok``: the residual target norm(max(0, p - q)) and the
    draft distribution the next sibling was drawn from (q without ``tok``)."""
    q_wo = jnp.where(jnp.arange(q_BV.shape[-1])[None, :] == tok_B[:, None], 0.0, q_BV)
    z = jnp.sum(q_wo, axis=-1, keepdims=True)
    return residual(p_BV, q_BV), jnp.where(z > 0, q_wo / jnp.maximum(z, 1e-30), 0.0)


def rejection_sample_tree(tree: TokenTree, key_B, node_tok_BT, q_BTV, p_BTV, greedy_B):
    """Lossless tree acceptance (see the module doc for the rule and references).

    Args:
      key_B: per-row keys (split as in ``rejection_sample_chain``: the uniforms of node i
        are ``uniform(ku, (N,))[i - 1]``, the next token uses ``kr``).
      node_tok_BT: int32 [B, N+1] node tokens (root first).
      q_BTV: draft distributions at the nodes (the children of node i were drawn from
        ``q[:, i]`` without replacement).
      p_BTV: target distributions at the nodes (after temperature / top-k / top-p).
      greedy_B: rows accepting by argmax match.

    Returns:
      (path_BP int32 [B, D+1] accepted node indices, root first, padded with the last
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

    def sibling(i, c):
        cur, stopped, p_cur, q_cur, amax, acc = c
        child = children[cur, i]
        tok = node_tok_BT[rows, child]
        qc, pc = q_cur[rows, tok], p_cur[rows, tok]
        live = (i < nch[cur]) & (acc < 0) & ~stopped
        ok = live & jnp.where(greedy_B, tok == amax, (qc > 0) & (u_BT[rows, child] * qc < pc))
        rej = live & ~ok & ~greedy_B & (qc > 0)
        p_new, q_new = _sibling_rejected(p_cur, q_cur, tok)
        p_cur = jnp.where(rej[:, None], p_new, p_cur)
        q_cur = jnp.where(rej[:, None], q_new, q_cur)
        return cur, stopped, p_cur, q_cur, amax, jnp.where(ok, child, acc)

    def depth_step(carry, _):
        cur, stopped, n_acc, final = carry
        p_cur, q_cur = p_BTV[rows, cur], q_BTV[rows, cur]
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
    path_BP = jnp.concatenate([zeros[:, None], path.T], axis=1)
    return path_BP, n_acc, sample(kr, final)
