"""The jitted draft -> verify -> accept -> commit loop: one step for chains and trees.

One ``lax.while_loop`` per generate call over a :class:`DecodeState`; nothing leaves the
device until every row is done. ``prefill`` and ``step`` are exposed separately so the
server runs the same body one iteration at a time (continuous batching).

Buffer layout (per row, right-padded): ``tokens[:prompt_len]`` is the prompt, generated
tokens follow, ``seq_len`` counts the valid tokens. The token at ``seq_len - 1`` is
*pending*: sampled but not yet run through the target, so the target cache always holds
exactly ``seq_len - 1`` entries. Prompts of different lengths share one batch through
per-row lengths; padded positions are masked in attention and dispatch to no expert.

Every iteration verifies a static token tree (``spec/tree.py``; a chain of K is the tree
of width 1, K = 0 is plain autoregressive decoding) with N draft nodes and depth D:
  draft   the proposer (``spec/proposers.py``: draft model, prompt lookup, oracle)
          fills the N nodes and gives the distributions they were drawn from;
  verify  one target forward over [root = pending, nodes 1..N] (T = N + 1) at positions
          seq_len-1+depth with the ancestor mask;
  accept  lossless (recursive) rejection sampling, greedy rows as its one-hot case
          (``sampling.rejection_sample_tree``); an expert budget that dropped an expert
          of an accepted node cuts the path there (lossless ``prune`` budget);
  commit  append the accepted path and the correction/bonus token; the target cache
          moves the path's K/V to contiguous slots (a no-op for chains), the proposer
          resyncs its own state; stop tokens and the per-row token limit apply.

Shape letters (DESIGN.md): B rows, M token-buffer / cache capacity, T tokens per forward
(N + 1 when verifying), N tree nodes, J = depth + 1 entries of an accepted path, V vocab,
P stop-token slots (D stays the model width; the tree depth is spelled out).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moesd_jax.kv_cache import KVCache, compact
from moesd_jax.models.transformer import apply
from moesd_jax.spec import proposers
from moesd_jax.spec import tree as spec_tree
from moesd_jax.spec import utility as spec_utility
from moesd_jax.spec.sampling import (
    filter_probs,
    rejection_sample_chain,
    rejection_sample_tree,
    sample,
    split_rows,
)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Static (hashable) description of one compiled decode program.

    Attributes:
      method: ``none`` (autoregressive) or a proposer name (``spec/proposers.py``:
        ``draft`` model, ``ngram`` prompt lookup, ``oracle`` for benchmarks).
      k: draft tokens per iteration of a chain (ignored for ``none`` and with ``tree``).
      max_len: N, token buffer and KV cache capacity per row.
      ngram_n: n-gram size for prompt lookup.
      max_stop: static number of stop-token slots per row.
      vocab: V of the target (and draft).
      num_experts: E of the target's MoE layers (0 for dense), for routing stats.
      prefill_dispatch: MoE dispatch override for prefill and plain (K = 0) decoding steps:
        the unbudgeted backend when the target's dispatch is ``*_budgeted`` (budgets apply
        to verification forwards only). Set = the target is budgeted (``budgeted``).
      budget_prune: the target verifies under a ``prune`` expert budget: acceptance is
        cut at the first accepted node that lost an expert (lossless), chains and trees.
      tree: static draft tree as a tuple of paths (``spec.tree``, see ``spec/tree.py``);
        None = a chain of ``k``. Every proposer fills trees.
      oracle_acceptance: the oracle proposer's per-node probability of the right token.
      plan: the sharding plan the models run under (expert-parallel MoE when it shards
        experts), passed to every model call; part of the program's identity.
      trace_steps: > 0 records each row's routing for its first ``trace_steps`` verify
        steps in ``DecodeState.routing_trace`` (``analysis/routing.py``); 0 = none.
      utility: utility-driven K (``spec/utility.py``): per-row K among its candidates,
        plain decoding where speculation loses; ``k`` is then the largest candidate.
        None = a static K.
    """

    method: str
    k: int
    max_len: int
    vocab: int
    ngram_n: int = 2
    max_stop: int = 8
    num_experts: int = 0
    tree: tuple[tuple[int, ...], ...] | None = None
    prefill_dispatch: str | None = None
    budget_prune: bool = False
    oracle_acceptance: float = 0.0
    plan: object = None  # sharding.ShardingPlan (compared by identity) or None
    trace_steps: int = 0
    utility: spec_utility.UtilityConfig | None = None

    @property
    def budgeted(self) -> bool:
        """The target's verification forwards run under an expert budget."""
        return self.prefill_dispatch is not None

    @property
    def token_tree(self) -> spec_tree.TokenTree | None:
        """The static tree every iteration verifies (a chain of ``k`` unless ``tree`` is
        set); None for plain autoregressive decoding."""
        if self.method == "none" or (self.tree is None and self.k == 0):
            return None
        return spec_tree.TokenTree.from_paths(self.tree or spec_tree.chain_paths(self.k))

    def plain(self) -> LoopConfig:
        """This program's plain decoding twin: no drafter, no controller."""
        return dataclasses.replace(self, method="none", k=0, tree=None, utility=None)

    @property
    def width(self) -> int:
        """Tokens per verification forward: T = N + 1 (a chain: K + 1)."""
        return 1 + self.k_eff

    @property
    def k_eff(self) -> int:
        """Draft nodes per iteration: K for a chain, N for a tree, 0 for AR."""
        t = self.token_tree
        return 0 if t is None else t.num_nodes

    @property
    def accept_positions(self) -> int:
        """Most drafts one iteration can accept: the tree depth (K for a chain)."""
        t = self.token_tree
        return 0 if t is None else t.depth


@struct.dataclass
class Stats:
    iterations_B: jax.Array  # int32 [B] verify steps per row
    drafted_B: jax.Array  # int32 [B] draft nodes proposed
    accepted_B: jax.Array  # int32 [B]
    accepted_pos_BK: jax.Array  # int32 [B, D] accepted drafts per depth
    unique_experts_L: jax.Array  # int32 [L_moe] sum over verify steps of distinct experts
    verify_steps: jax.Array  # int32 [] verify forwards with at least one active row
    draft_fed_B: jax.Array  # int32 [B] tokens run through a draft model
    # expert budget (LoopConfig.budgeted; zeros otherwise): batch-wide sums over the
    # budgeted verify steps, per MoE layer, of (distinct experts loaded, distinct experts
    # of the same tokens' natural routing = what an unbudgeted forward loads, routing
    # mass on the loaded experts, total routing mass of the verified tokens)
    budget_L4: jax.Array  # float32 [L_moe, 4]
    budget_steps: jax.Array  # int32 [] budgeted verify steps
    nodes_pruned_B: jax.Array  # int32 [B] draft nodes pruned by a lossless budget


@struct.dataclass
class DecodeState:
    tokens_BM: jax.Array  # int32 [B, N]
    seq_len_B: jax.Array  # int32 [B]
    prompt_len_B: jax.Array  # int32 [B]
    max_total_B: jax.Array  # int32 [B] prompt_len + max_new_tokens
    done_B: jax.Array  # bool [B]
    target_cache: KVCache
    proposer_state: object  # the proposer's own per-row state (a draft KV cache, ...)
    key_B: jax.Array  # per-row PRNG keys
    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    stop_ids_BP: jax.Array  # int32 [B, max_stop], -1 = unused
    stats: Stats
    # int16 [S, B, T, L_moe, K]: the expert ids each row's verify step s routed its T
    # tokens to (E = no expert: inactive rows, dropped by a budget); None unless
    # LoopConfig.trace_steps > 0. Row b's valid steps: stats.iterations_B[b].
    routing_trace: object = None
    # int32 [B]: each row's draft limit (nodes deeper than it are masked: never accepted,
    # not dispatched to experts, not counted as drafted; 0 = plain decoding for the row)
    # within the program's static K / tree; None = no limit.
    draft_k_B: object = None
    controller: object = None  # spec_utility.Controller with LoopConfig.utility


def _num_moe_layers(graphdef, state) -> int:
    from flax import nnx

    model = nnx.merge(graphdef, state)
    return sum(int(layer.is_moe) for layer in model.layers)


def prefill(cfg: LoopConfig, target, draft, prompts_BT, prompt_len_B, max_new_B,
            temperature_B, top_k_B, top_p_B, seed_B, stop_ids_BP,
            ref_tokens_BM=None, draft_k_B=None, utility_cost_K=None,
            utility_prior=None, utility_prior_weight=None) -> DecodeState:
    """Runs the prompts through the target (and the proposer) and samples the first token.

    Args:
      cfg: static loop config.
      target: (graphdef, state) of the target; draft: the proposer's model the same way
        (the draft model) or None.
      prompts_BT: int32 right-padded prompts; prompt_len_B: their lengths (>= 1).
      max_new_B: int32 new-token limit per row (>= 1).
      temperature_B, top_k_B, top_p_B: per-row sampling parameters.
      seed_B: int32 per-row seeds (rows are reproducible independently of the batch).
      stop_ids_BP: int32 [B, max_stop] stop tokens per row, -1 padded.
      ref_tokens_BM: ``oracle`` only: int32 [B, M] reference rows in buffer layout (prompt
        then the target's greedy continuation), M <= max_len.
      draft_k_B: optional int32 [B] per-row draft limit (``DecodeState.draft_k_B``).
      utility_cost_K: float32 [K_max + 1] iteration costs for ``cfg.utility``
        (``SpecDecoder.utility_costs``: timed or ``cost_model.model_iteration_costs``).
      utility_prior: float32 [] per-draft acceptance rate expected before testing (the
        decoder's recent calls'; < 0 or None: none), ``spec.utility.init``'s ``prior``;
      utility_prior_weight: float32 [] its weight in test iterations (``prior_weight``).
    """
    b, p = prompts_BT.shape
    n = cfg.max_len
    tokens = jnp.zeros((b, n), jnp.int32).at[:, :p].set(prompts_BT)
    pos_BT = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
    valid_BT = pos_BT < prompt_len_B[:, None]
    tg, ts = target
    tmodel_cfg = proposers.model_cfg(tg, ts)
    tcache = KVCache.init(tmodel_cfg.num_layers, b, n, tmodel_cfg.num_kv_heads,
                          tmodel_cfg.dh, jnp.dtype(tmodel_cfg.compute_dtype))
    proposer = proposers.get(cfg.method) if cfg.token_tree is not None else None
    hl = None if proposer is None else proposer.hidden_layers(draft)
    out = apply(tg, ts, prompts_BT, pos_BT, tcache, token_valid_BT=valid_BT,
                dispatch=cfg.prefill_dispatch, hidden_layers=hl, plan=cfg.plan)
    logits, tcache = out[:2]
    last = jnp.take_along_axis(logits, (prompt_len_B - 1)[:, None, None], axis=1)[:, 0]
    key_B = jax.vmap(jax.random.PRNGKey)(seed_B)
    key_B, use = split_rows(key_B)
    first = sample(use, filter_probs(last, temperature_B, top_k_B, top_p_B))
    tokens = tokens.at[jnp.arange(b), prompt_len_B].set(first, mode="drop")
    tcache = tcache.replace(lengths=prompt_len_B)
    pstate = None
    if proposer is not None:
        pstate = proposer.init(cfg, draft, prompts_BT, pos_BT, valid_BT, prompt_len_B, n,
                               ref_tokens_BM, hidden=out[3] if hl is not None else None)
    seq_len = prompt_len_B + 1
    max_total = prompt_len_B + max_new_B
    done = _is_stop(first, stop_ids_BP) | (seq_len >= max_total)
    n_moe = _num_moe_layers(tg, ts)
    kk = max(cfg.accept_positions, 1)
    z = jnp.zeros((b,), jnp.int32)
    stats = Stats(z, z, z, jnp.zeros((b, kk), jnp.int32), jnp.zeros((n_moe,), jnp.int32),
                  jnp.zeros((), jnp.int32), z, jnp.zeros((n_moe, 4), jnp.float32),
                  jnp.zeros((), jnp.int32), z)
    trace = None
    if cfg.trace_steps and n_moe:
        top_k = proposers.model_cfg(tg, ts).moe.top_k
        trace = jnp.full((cfg.trace_steps, b, cfg.width, n_moe, top_k), cfg.num_experts,
                         jnp.int16)
    return DecodeState(tokens, seq_len, prompt_len_B, max_total, done, tcache, pstate, key_B,
                       temperature_B.astype(jnp.float32), top_k_B.astype(jnp.int32),
                       top_p_B.astype(jnp.float32), stop_ids_BP.astype(jnp.int32), stats,
                       trace,
                       jnp.full((b,), cfg.k, jnp.int32) if draft_k_B is None and cfg.utility
                       else None if draft_k_B is None else draft_k_B.astype(jnp.int32),
                       None if cfg.utility is None else
                       spec_utility.init(cfg.utility, b, utility_cost_K, seq_len,
                                         utility_prior, utility_prior_weight))


def _is_stop(tok, stop_ids_BP):
    """tok: [B] or [B, T] -> bool of the same shape."""
    if tok.ndim == 1:
        return jnp.any(tok[:, None] == stop_ids_BP, axis=-1)
    return jnp.any(tok[:, :, None] == stop_ids_BP[:, None, :], axis=-1)


def _target_probs(s: DecodeState, logits_BTV):
    """Each row's sampling filter applied at every verified position: [B, T, V]."""
    b, t, v = logits_BTV.shape
    rep = lambda x: jnp.repeat(x, t)  # noqa: E731  row params -> (row, position)
    p = filter_probs(logits_BTV.reshape(b * t, v), rep(s.temperature_B), rep(s.top_k_B),
                     rep(s.top_p_B))
    return p.reshape(b, t, v)


def _append(s: DecodeState, new_BT, n_new_B, active_B):
    """Appends the first ``n_new`` of ``new_BT`` to each active row's buffer.

    Cuts at the first stop token (kept) and at the row's token limit. Returns (tokens,
    seq_len, done, n_new actually appended).
    """
    b, w = new_BT.shape
    j = jnp.arange(w, dtype=jnp.int32)[None, :]
    is_stop = _is_stop(new_BT, s.stop_ids_BP) & (j < n_new_B[:, None])
    first_stop = jnp.min(jnp.where(is_stop, j, w), axis=1)
    n_new = jnp.minimum(n_new_B, first_stop + 1)
    n_new = jnp.minimum(n_new, s.max_total_B - s.seq_len_B)
    n_new = jnp.where(active_B, n_new, 0)
    wpos = jnp.where(j < n_new[:, None], s.seq_len_B[:, None] + j, s.tokens_BM.shape[1])
    tokens = s.tokens_BM.at[jnp.arange(b)[:, None], wpos].set(new_BT, mode="drop")
    seq_len = s.seq_len_B + n_new
    done = s.done_B | (active_B & ((first_stop + 1 <= n_new) | (seq_len >= s.max_total_B)))
    return tokens, seq_len, done, n_new


def node_priority(tree, node_tok_BT, q_BTV=None) -> jax.Array:
    """float32 [B, N+1]: each draft node's log-score of being accepted, for the lossless
    budget's path selection: the sum over its path (root excluded) of the log draft
    probability of each node's token (``q_BTV`` at the parent; none for a deterministic
    proposer, and 0 for greedy rows, whose q is one-hot) plus a rank prior
    ``-log(1 + rank)`` (the tree's r-th child is less likely than its first). A child
    never scores above its parent, so any prefix in priority order is a subtree."""
    t = tree.num_nodes + 1
    prior = -np.log1p(np.asarray(tree.ranks, np.float32))
    prior[0] = 0.0
    node_BT = jnp.broadcast_to(jnp.asarray(prior)[None, :], node_tok_BT.shape)
    if q_BTV is not None:
        b, _, v = q_BTV.shape
        par = np.maximum(np.asarray(tree.parents), 0)
        flat = jnp.asarray(par, jnp.int32)[None, :] * v + node_tok_BT  # q at the parent
        q_BT = jnp.take_along_axis(q_BTV.reshape(b, t * v), flat, axis=1)
        logq = jnp.log(jnp.clip(q_BT, 1e-6, 1.0))
        node_BT = node_BT + jnp.where(jnp.arange(t)[None, :] > 0, logq, 0.0)
    anc = jnp.asarray(np.asarray(tree.ancestor_mask, np.float32))  # [i, j]: j on i's path
    return jnp.einsum("BJ,IJ->BI", node_BT, anc, precision=jax.lax.Precision.HIGHEST)


def _budget_cut(cfg: LoopConfig, routing, path_BJ, n_acc):
    """Lossless ``prune`` budget: the first accepted node that lost an expert ends the
    path there without a bonus token.

    Node ``path[f]`` lost an expert under the budget, so the target distribution at it
    (and below) is not the target's; the drafts ``path[1..f]`` were tested against the
    valid distributions at ``path[0..f-1]``: if all passed, commit them without a bonus
    token (the root always keeps its experts, so f >= 1 and the row still advances).
    Returns (n_acc, n_new).
    """
    alive_BT = jnp.all(routing < cfg.num_experts, axis=(2, 3))  # [B, N+1]
    alive_BJ = jnp.take_along_axis(alive_BT, path_BJ, axis=1)
    p = path_BJ.shape[1]
    f = jnp.min(jnp.where(alive_BJ, p, jnp.arange(p)[None, :]), axis=1)
    cut = n_acc >= f
    return jnp.where(cut, f, n_acc), jnp.where(cut, f, n_acc + 1)


def step(cfg: LoopConfig, target, draft, s: DecodeState, static_batch: bool = False
         ) -> DecodeState:
    """One draft -> verify -> accept -> commit iteration for every active row.

    ``draft`` is the proposer's model (``nnx.split`` pieces) or None. With
    ``cfg.utility`` the iteration runs the chain of the largest K an active row needs
    (a ``lax.switch`` over the candidates, K = 0 = plain decoding), smaller Ks masked per
    row, and the controller then updates (``spec/utility.py``).

    ``static_batch`` (``generate_loop``: rows never refill, the loop ends with its
    slowest row): with ``cfg.utility``, the controller minimises the batch's finishing
    time (``utility.update``'s ``remaining_B``), and the chosen branch keeps iterating
    (an inner ``lax.while_loop``) until every row is done or the controller needs another
    branch, so the switch runs once per phase, not per iteration. XLA copies the KV
    caches that pass through a conditional's branch (on CPU, about 7% of an iteration of
    the bundled pair at batch 10); inside the inner loop they update in place, as in the
    plain program.
    """
    if cfg.utility is None:
        return _step(cfg, target, draft, s)
    u = cfg.utility
    ks = jnp.asarray(u.branch_ks)
    proposer = proposers.get(cfg.method)

    def branch_of(s):  # the smallest branch K >= the largest K an active row needs
        need = jnp.max(jnp.where(~s.done_B, spec_utility.draft_limits(u, s.controller), 0))
        return jnp.sum(ks < need).astype(jnp.int32)

    def iteration(k, s):
        active = ~s.done_B
        ctrl = s.controller
        s = s.replace(draft_k_B=spec_utility.draft_limits(u, ctrl))
        if k == 0:
            out = _step(cfg.plain(), target, draft, s)
        else:  # bring the draft state up to date over tokens decoded plainly
            lag = jnp.any(active & (s.seq_len_B > ctrl.sync_B))
            ps = jax.lax.cond(lag, lambda ps: proposer.catch_up(
                cfg, draft, ps, s, ctrl.sync_B, u.set_iters * u.max_backoff + 2),
                lambda ps: ps,
                s.proposer_state)
            out = _step(dataclasses.replace(cfg, k=k, utility=None), target, draft,
                        s.replace(proposer_state=ps))
        n_acc = out.stats.accepted_B - s.stats.accepted_B
        ctrl = spec_utility.update(u, ctrl, active, n_acc, (
            out.max_total_B - out.seq_len_B) if static_batch else None)
        sync = out.seq_len_B if k > 0 else ctrl.sync_B
        return out.replace(controller=ctrl.replace(sync_B=sync))

    def run(i, k):
        one = functools.partial(iteration, k)
        if not static_batch:
            return one
        # on entry the condition holds (the outer loop's, and the switch chose i)
        return lambda s: jax.lax.while_loop(
            lambda s: jnp.any(~s.done_B) & (branch_of(s) == i), one, s)

    return jax.lax.switch(branch_of(s), [run(i, k) for i, k in enumerate(u.branch_ks)], s)


def _step(cfg: LoopConfig, target, draft, s: DecodeState) -> DecodeState:
    """``step`` for one static K / tree (per-row limits from ``s.draft_k_B``)."""
    tree = cfg.token_tree
    b = s.tokens_BM.shape[0]
    active = ~s.done_B
    pos0 = s.seq_len_B - 1
    key_B = s.key_B
    pstate = s.proposer_state
    if tree is None:  # plain autoregressive decoding: the tree is the root alone
        n, depth, depths = 0, 0, jnp.zeros((1,), jnp.int32)
        anc = None
        node_tok = jnp.take_along_axis(s.tokens_BM, pos0[:, None], axis=1)
        fed = 0
    else:
        n, depth, depths = tree.num_nodes, tree.depth, jnp.asarray(tree.depths)
        anc = None if tree.is_chain else jnp.asarray(tree.ancestor_mask)  # chains: causal
        proposer = proposers.get(cfg.method)
        with jax.named_scope("draft"):
            prop = proposer.propose(cfg, tree, draft, s, active)
        node_tok, key_B, pstate, fed = prop.tokens_BT, prop.key_B, prop.state, prop.fed
    t = n + 1
    node_ok = None  # [B, T]: nodes within each row's draft limit
    if tree is not None and s.draft_k_B is not None:
        node_ok = depths[None, :] <= s.draft_k_B[:, None]  # the proposer still drafts all

    with jax.named_scope("verify"):
        tg, ts = target
        pos_BT = pos0[:, None] + depths[None, :]
        valid_BT = jnp.broadcast_to(active[:, None], (b, t))
        if node_ok is not None:  # masked nodes dispatch to no expert
            valid_BT = valid_BT & node_ok
        tcache = s.target_cache.replace(lengths=pos0)
        root_BT = jnp.broadcast_to(jnp.arange(t)[None, :] == 0, (b, t))
        hl = None if tree is None else proposer.hidden_layers(draft)
        # budgets apply to verification only: a plain decoding step runs unbudgeted
        budgeted = cfg.budgeted and tree is not None
        # lossless budgets cover the likeliest nodes first (path selection)
        prio = (node_priority(tree, node_tok, prop.q_BTV)
                if budgeted and cfg.budget_prune else None)
        out = apply(tg, ts, node_tok, pos_BT, tcache, tree_mask=anc, token_valid_BT=valid_BT,
                    return_routing=True, root_BT=root_BT, hidden_layers=hl, plan=cfg.plan,
                    dispatch=None if budgeted else cfg.prefill_dispatch,
                    return_budget_stats=budgeted, priority_BT=prio)
        logits, tcache, routing = out[:3]
        hidden = out[3] if hl is not None else None

    with jax.named_scope("accept"):
        p = _target_probs(s, logits)
        key_B, use = split_rows(key_B)
        if tree is None:
            path_BJ = jnp.zeros((b, 1), jnp.int32)
            n_acc, nxt = rejection_sample_chain(use, node_tok[:, 1:], p[:, :0], p)
        else:
            path_BJ, n_acc, nxt = rejection_sample_tree(tree, use, node_tok, prop.q_BTV, p,
                                                        s.temperature_B <= 0.0, node_ok)
        n_new = n_acc + 1
        pruned = jnp.zeros((b,), jnp.int32)
        if cfg.budget_prune and routing is not None and tree is not None:
            n_acc, n_new = _budget_cut(cfg, routing, path_BJ, n_acc)
            lost_BT = valid_BT & jnp.any(routing >= cfg.num_experts, axis=(2, 3))
            pruned = jnp.sum(lost_BT[:, 1:], axis=1).astype(jnp.int32)

    with jax.named_scope("commit"):
        w = depth + 1
        j = jnp.arange(w, dtype=jnp.int32)[None, :]
        path_tok = jnp.take_along_axis(node_tok, path_BJ, axis=1)  # [B, D+1], root first
        drafts_pad = jnp.concatenate([path_tok[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
        new_BT = jnp.where(j < n_acc[:, None], drafts_pad, nxt[:, None])
        tokens, seq_len, done, n_new = _append(s, new_BT, n_new, active)
        if tree is None or tree.is_chain:  # accepted entries already contiguous
            tcache = tcache.replace(lengths=seq_len - 1)
        else:  # root + accepted nodes -> slots pos0 .. pos0 + n_new - 1
            tcache = compact(tcache, path_BJ, n_new)
        if tree is not None:
            pstate = proposer.commit(cfg, tree, draft, pstate, pos0, path_BJ, n_new,
                                     hidden=hidden)

    st = s.stats
    act = active.astype(jnp.int32)
    kk = st.accepted_pos_BK.shape[1]
    acc_pos = (jnp.arange(kk)[None, :] < n_acc[:, None]).astype(jnp.int32) * act[:, None]
    uniq = st.unique_experts_L
    uniq_L = None
    if routing is not None and cfg.num_experts:
        onehot = jax.nn.one_hot(routing.astype(jnp.int32), cfg.num_experts, dtype=jnp.int32)
        present_LE = jnp.einsum("BTLKE->LE", onehot) > 0  # dropped ids (== E) are all-zero
        uniq_L = jnp.sum(present_LE, axis=1).astype(jnp.int32)
        uniq = uniq + uniq_L
    drafted = n if node_ok is None else jnp.sum(node_ok[:, 1:], axis=1).astype(jnp.int32)
    b_sum, b_steps = st.budget_L4, st.budget_steps
    if budgeted and uniq_L is not None:
        step_L4 = jnp.concatenate([uniq_L[:, None].astype(jnp.float32), out[-1]], axis=1)
        any_act = jnp.any(active)
        b_sum = b_sum + jnp.where(any_act, step_L4, 0.0)
        b_steps = b_steps + any_act.astype(jnp.int32)
    stats = Stats(st.iterations_B + act, st.drafted_B + drafted * act,
                  st.accepted_B + n_acc * act,
                  st.accepted_pos_BK + acc_pos, uniq,
                  st.verify_steps + jnp.any(active).astype(jnp.int32),
                  st.draft_fed_B + fed * act, b_sum, b_steps,
                  st.nodes_pruned_B + pruned * act)
    trace = s.routing_trace
    if trace is not None and routing is not None:  # row b writes slot iterations_B[b]
        slot = jnp.where(active, st.iterations_B, trace.shape[0])
        rt = routing.astype(jnp.int16)
        if rt.shape[1] < trace.shape[2]:  # a narrower utility branch: pad with "no expert"
            rt = jnp.pad(rt, ((0, 0), (0, trace.shape[2] - rt.shape[1]), (0, 0), (0, 0)),
                         constant_values=cfg.num_experts)
        trace = trace.at[slot, jnp.arange(b)].set(rt, mode="drop")
    return s.replace(tokens_BM=tokens, seq_len_B=seq_len, done_B=done, target_cache=tcache,
                     proposer_state=pstate, key_B=key_B, stats=stats, routing_trace=trace)


def generate_loop(cfg: LoopConfig, target, draft, *prefill_args) -> DecodeState:
    """prefill + ``lax.while_loop`` of ``step`` until every row is done."""
    s = prefill(cfg, target, draft, *prefill_args)
    return jax.lax.while_loop(lambda s: jnp.any(~s.done_B),
                              lambda s: step(cfg, target, draft, s, static_batch=True), s)
