"""The jitted draft -> verify -> accept -> commit loop.

One ``lax.while_loop`` per generate call over a :class:`DecodeState`; nothing leaves the
device until every row is done. ``prefill`` and ``step`` are exposed separately so the
server can run the same body one iteration at a time (continuous batching).

Buffer layout (per row, right-padded): ``tokens[:prompt_len]`` is the prompt, generated
tokens follow, ``seq_len`` counts the valid tokens. The token at ``seq_len - 1`` is
*pending*: sampled but not yet run through the target, so the target cache always holds
exactly ``seq_len - 1`` entries. Prompts of different lengths share one batch through
per-row lengths; padded positions are masked in attention and dispatch to no expert.

One iteration with a chain of K drafts (K = 0 is plain autoregressive decoding):
  draft   K tokens from the drafter (draft model or prompt lookup) with distributions q;
  verify  one target forward over [pending, d_1..d_K] (T = K + 1) at positions
          seq_len-1 .. seq_len-1+K;
  accept  lossless rejection sampling (greedy rows: accept iff draft == argmax);
  commit  append accepted drafts and the correction/bonus token, advance the cache
          length, apply stop tokens and the per-row token limit.

With a static draft tree (``LoopConfig.tree``) the same four stages run over the N tree
nodes instead (``_tree_step``, ``spec/tree.py``): T = N + 1 with the ancestor mask, and
the accepted path's K/V is compacted into contiguous cache positions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from moesd_jax.kv_cache import KVCache, compact
from moesd_jax.models.transformer import apply
from moesd_jax.spec import drafters
from moesd_jax.spec import tree as spec_tree
from moesd_jax.spec.sampling import filter_probs, rejection_sample_chain, sample, split_rows


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Static (hashable) description of one compiled decode program.

    Attributes:
      method: ``none`` (autoregressive), ``draft`` (draft model), ``ngram`` or ``oracle``
        (benchmarks: the reference continuation ``DecodeState.ref_tokens_BN``).
      k: draft tokens per iteration (ignored for ``none``).
      max_len: N, token buffer and KV cache capacity per row.
      ngram_n: n-gram size for prompt lookup.
      max_stop: static number of stop-token slots per row.
      vocab: V of the target (and draft).
      num_experts: E of the target's MoE layers (0 for dense), for routing stats.
      prefill_dispatch: MoE dispatch override for prefill (the unbudgeted backend when the
        target's dispatch is ``*_budgeted``: budgets apply to verification only).
      budget_prune: the target verifies under a ``prune`` expert budget: acceptance is
        cut at the first draft position that lost an expert (lossless).
      tree: static draft tree as a tuple of paths (``spec.tree``, see ``spec/tree.py``);
        None = a chain of ``k``. Needs ``method == "draft"``.
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

    @property
    def width(self) -> int:
        """Tokens per verification forward: T = K + 1 (trees: N + 1)."""
        return 1 + self.k_eff

    @property
    def k_eff(self) -> int:
        """Draft tokens per iteration: K for a chain, N nodes for a tree."""
        if self.method == "none":
            return 0
        return len(self.tree) if self.tree is not None else self.k

    @property
    def accept_positions(self) -> int:
        """Most drafts one iteration can accept: K for a chain, the depth for a tree."""
        if self.method != "none" and self.tree is not None:
            return max(len(p) for p in self.tree)
        return self.k_eff


@struct.dataclass
class Stats:
    iterations_B: jax.Array  # int32 [B] verify steps per row
    drafted_B: jax.Array  # int32 [B]
    accepted_B: jax.Array  # int32 [B]
    accepted_pos_BK: jax.Array  # int32 [B, K]
    unique_experts_L: jax.Array  # int32 [L_moe] sum over verify steps of distinct experts
    verify_steps: jax.Array  # int32 [] verify forwards with at least one active row


@struct.dataclass
class DecodeState:
    tokens_BN: jax.Array  # int32 [B, N]
    seq_len_B: jax.Array  # int32 [B]
    prompt_len_B: jax.Array  # int32 [B]
    max_total_B: jax.Array  # int32 [B] prompt_len + max_new_tokens
    done_B: jax.Array  # bool [B]
    target_cache: KVCache
    draft_cache: KVCache | None
    key_B: jax.Array  # per-row PRNG keys
    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    stop_ids_BS: jax.Array  # int32 [B, max_stop], -1 = unused
    stats: Stats
    ref_tokens_BN: jax.Array | None = None  # int32 [B, N] oracle drafter's reference


def _num_moe_layers(graphdef, state) -> int:
    from flax import nnx

    model = nnx.merge(graphdef, state)
    return sum(int(layer.is_moe) for layer in model.layers)


def prefill(cfg: LoopConfig, target, draft, prompts_BP, prompt_len_B, max_new_B,
            temperature_B, top_k_B, top_p_B, seed_B, stop_ids_BS,
            ref_tokens_BM=None) -> DecodeState:
    """Runs the prompts through the target (and draft) and samples the first new token.

    Args:
      cfg: static loop config.
      target: (graphdef, state) of the target; draft: same for the draft model or None.
      prompts_BP: int32 right-padded prompts; prompt_len_B: their lengths (>= 1).
      max_new_B: int32 new-token limit per row (>= 1).
      temperature_B, top_k_B, top_p_B: per-row sampling parameters.
      seed_B: int32 per-row seeds (rows are reproducible independently of the batch).
      stop_ids_BS: int32 [B, max_stop] stop tokens per row, -1 padded.
      ref_tokens_BM: ``oracle`` only: int32 [B, M] reference rows in buffer layout (prompt
        then the target's greedy continuation), M <= max_len.
    """
    b, p = prompts_BP.shape
    n = cfg.max_len
    tokens = jnp.zeros((b, n), jnp.int32).at[:, :p].set(prompts_BP)
    pos_BP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
    valid_BP = pos_BP < prompt_len_B[:, None]
    tg, ts = target
    tmodel_cfg = _model_cfg(tg, ts)
    tcache = KVCache.init(tmodel_cfg.num_layers, b, n, tmodel_cfg.num_kv_heads,
                          tmodel_cfg.dh, jnp.dtype(tmodel_cfg.compute_dtype))
    logits, tcache, _ = apply(tg, ts, prompts_BP, pos_BP, tcache, token_valid_BT=valid_BP,
                              dispatch=cfg.prefill_dispatch)
    last = jnp.take_along_axis(logits, (prompt_len_B - 1)[:, None, None], axis=1)[:, 0]
    key_B = jax.vmap(jax.random.PRNGKey)(seed_B)
    key_B, use = split_rows(key_B)
    first = sample(use, filter_probs(last, temperature_B, top_k_B, top_p_B))
    tokens = tokens.at[jnp.arange(b), prompt_len_B].set(first, mode="drop")
    tcache = tcache.replace(lengths=prompt_len_B)
    dcache = None
    if draft is not None:
        dg, ds = draft
        dmodel_cfg = _model_cfg(dg, ds)
        dcache = KVCache.init(dmodel_cfg.num_layers, b, n, dmodel_cfg.num_kv_heads,
                              dmodel_cfg.dh, jnp.dtype(dmodel_cfg.compute_dtype))
        _, dcache, _ = apply(dg, ds, prompts_BP, pos_BP, dcache, token_valid_BT=valid_BP)
        dcache = dcache.replace(lengths=prompt_len_B)
    seq_len = prompt_len_B + 1
    max_total = prompt_len_B + max_new_B
    done = _is_stop(first, stop_ids_BS) | (seq_len >= max_total)
    n_moe = _num_moe_layers(tg, ts)
    kk = max(cfg.accept_positions, 1)
    stats = Stats(jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32),
                  jnp.zeros((b,), jnp.int32), jnp.zeros((b, kk), jnp.int32),
                  jnp.zeros((n_moe,), jnp.int32), jnp.zeros((), jnp.int32))
    ref = None
    if cfg.method == "oracle":
        if ref_tokens_BM is None:
            raise ValueError("spec method 'oracle' needs the reference tokens")
        ref = jnp.zeros((b, n), jnp.int32).at[:, :ref_tokens_BM.shape[1]].set(ref_tokens_BM)
    return DecodeState(tokens, seq_len, prompt_len_B, max_total, done, tcache, dcache, key_B,
                       temperature_B.astype(jnp.float32), top_k_B.astype(jnp.int32),
                       top_p_B.astype(jnp.float32), stop_ids_BS.astype(jnp.int32), stats, ref)


def _model_cfg(graphdef, state):
    from flax import nnx

    return nnx.merge(graphdef, state).cfg


def _is_stop(tok, stop_ids_BS):
    """tok: [B] or [B, T] -> bool of the same shape."""
    if tok.ndim == 1:
        return jnp.any(tok[:, None] == stop_ids_BS, axis=-1)
    return jnp.any(tok[:, :, None] == stop_ids_BS[:, None, :], axis=-1)


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
    is_stop = _is_stop(new_BT, s.stop_ids_BS) & (j < n_new_B[:, None])
    first_stop = jnp.min(jnp.where(is_stop, j, w), axis=1)
    n_new = jnp.minimum(n_new_B, first_stop + 1)
    n_new = jnp.minimum(n_new, s.max_total_B - s.seq_len_B)
    n_new = jnp.where(active_B, n_new, 0)
    wpos = jnp.where(j < n_new[:, None], s.seq_len_B[:, None] + j, s.tokens_BN.shape[1])
    tokens = s.tokens_BN.at[jnp.arange(b)[:, None], wpos].set(new_BT, mode="drop")
    seq_len = s.seq_len_B + n_new
    done = s.done_B | (active_B & ((first_stop + 1 <= n_new) | (seq_len >= s.max_total_B)))
    return tokens, seq_len, done, n_new


def step(cfg: LoopConfig, target, draft, s: DecodeState) -> DecodeState:
    """One draft -> verify -> accept -> commit iteration for every active row."""
    if cfg.tree is not None and cfg.k_eff > 0:
        return _tree_step(cfg, target, draft, s)
    b, n = s.tokens_BN.shape
    k = cfg.k_eff
    active = ~s.done_B
    pos0 = s.seq_len_B - 1
    x0 = jnp.take_along_axis(s.tokens_BN, pos0[:, None], axis=1)  # [B, 1]
    key_B = s.key_B
    dcache = s.draft_cache

    with jax.named_scope("draft"):
        if cfg.method == "draft" and k > 0:
            dg, ds = draft
            drafts, q, dcache, key_B = drafters.draft_model_chain(
                dg, ds, dcache, s.tokens_BN, s.seq_len_B, k, key_B, s.temperature_B,
                s.top_k_B, s.top_p_B, active)
        elif cfg.method == "oracle" and k > 0:
            drafts, q, key_B = drafters.oracle_chain(s.ref_tokens_BN, s.seq_len_B, k,
                                                     cfg.oracle_acceptance, key_B, cfg.vocab)
        elif cfg.method == "ngram" and k > 0:
            drafts, q = drafters.ngram_chain(s.tokens_BN, s.seq_len_B, k, cfg.ngram_n,
                                             cfg.vocab)
        else:
            drafts = jnp.zeros((b, 0), jnp.int32)
            q = jnp.zeros((b, 0, cfg.vocab), jnp.float32)

    with jax.named_scope("verify"):
        tg, ts = target
        t = k + 1
        vt_BT = jnp.concatenate([x0, drafts], axis=1)
        pos_BT = pos0[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        valid_BT = jnp.broadcast_to(active[:, None], (b, t))
        tcache = s.target_cache.replace(lengths=pos0)
        root_BT = jnp.broadcast_to(jnp.arange(t)[None, :] == 0, (b, t))
        logits, tcache, routing = apply(tg, ts, vt_BT, pos_BT, tcache, token_valid_BT=valid_BT,
                                        return_routing=True, root_BT=root_BT)

    with jax.named_scope("accept"):
        p = _target_probs(s, logits)
        key_B, use = split_rows(key_B)
        n_acc, nxt = rejection_sample_chain(use, drafts, q, p)
        n_new = n_acc + 1
        if cfg.budget_prune and routing is not None:
            # Position f lost an expert under the budget, so p_f (and every later p) is
            # not the target's. Drafts d_1..d_f were tested against valid p_0..p_{f-1}:
            # if all passed, commit them without a bonus token (the root, position 0,
            # always keeps its experts, so f >= 1 and the row still advances).
            alive_BT = jnp.all(routing < cfg.num_experts, axis=(2, 3))
            f = jnp.min(jnp.where(alive_BT, t, jnp.arange(t)[None, :]), axis=1)
            cut = n_acc >= f
            n_acc = jnp.where(cut, f, n_acc)
            n_new = jnp.where(cut, f, n_new)

    with jax.named_scope("commit"):
        j = jnp.arange(t, dtype=jnp.int32)[None, :]
        drafts_pad = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
        new_BT = jnp.where(j < n_acc[:, None], drafts_pad, nxt[:, None])
        tokens, seq_len, done, n_new = _append(s, new_BT, n_new, active)
        tcache = tcache.replace(lengths=seq_len - 1)

    st = s.stats
    act = active.astype(jnp.int32)
    kk = st.accepted_pos_BK.shape[1]
    acc_pos = (jnp.arange(kk)[None, :] < n_acc[:, None]).astype(jnp.int32) * act[:, None]
    uniq = st.unique_experts_L
    if routing is not None and cfg.num_experts:
        onehot = jax.nn.one_hot(routing.astype(jnp.int32), cfg.num_experts, dtype=jnp.int32)
        present_LE = jnp.einsum("BTLKE->LE", onehot) > 0  # dropped ids (== E) are all-zero
        uniq = uniq + jnp.sum(present_LE, axis=1).astype(jnp.int32)
    stats = Stats(st.iterations_B + act, st.drafted_B + k * act, st.accepted_B + n_acc * act,
                  st.accepted_pos_BK + acc_pos, uniq,
                  st.verify_steps + jnp.any(active).astype(jnp.int32))
    return s.replace(tokens_BN=tokens, seq_len_B=seq_len, done_B=done, target_cache=tcache,
                     draft_cache=dcache, key_B=key_B, stats=stats)


def _tree_step(cfg: LoopConfig, target, draft, s: DecodeState) -> DecodeState:
    """``step`` for a static draft tree (``cfg.tree``; see ``spec/tree.py``).

    draft   D draft-model forwards (one per depth level) give N node tokens and the draft
            distributions they were drawn from (children without replacement);
    verify  one target forward over [root, nodes 1..N] at positions seq_len-1+depth with
            the ancestor mask (T = N + 1);
    accept  greedy longest matching path / recursive rejection sampling over siblings;
    commit  ``kv_cache.compact`` moves the accepted path's K/V (target and draft caches,
            per row) to contiguous positions; tokens, stops and limits as for chains.
    """
    tree = spec_tree.TokenTree.from_paths(cfg.tree)
    b, n = s.tokens_BN.shape
    t = tree.num_nodes + 1
    dmax = tree.depth
    active = ~s.done_B
    pos0 = s.seq_len_B - 1

    with jax.named_scope("draft"):
        dg, ds = draft
        node_tok, q, dcache, key_B = spec_tree.draft_model_tree(
            tree, dg, ds, s.draft_cache, s.tokens_BN, s.seq_len_B, s.key_B, s.temperature_B,
            s.top_k_B, s.top_p_B, active)

    with jax.named_scope("verify"):
        tg, ts = target
        pos_BT = pos0[:, None] + jnp.asarray(tree.depths)[None, :]
        valid_BT = jnp.broadcast_to(active[:, None], (b, t))
        tcache = s.target_cache.replace(lengths=pos0)
        logits, tcache, routing = apply(tg, ts, node_tok, pos_BT, tcache,
                                        tree_mask=jnp.asarray(tree.ancestor_mask),
                                        token_valid_BT=valid_BT, return_routing=True)

    with jax.named_scope("accept"):
        p = _target_probs(s, logits)
        key_B, use = split_rows(key_B)
        path_BP, n_acc, nxt = spec_tree.rejection_sample_tree(
            tree, use, node_tok, q, p, s.temperature_B <= 0.0)

    with jax.named_scope("commit"):
        w = dmax + 1
        j = jnp.arange(w, dtype=jnp.int32)[None, :]
        path_tok = jnp.take_along_axis(node_tok, path_BP, axis=1)  # [B, D+1], root first
        drafts_pad = jnp.concatenate([path_tok[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
        new_BT = jnp.where(j < n_acc[:, None], drafts_pad, nxt[:, None])
        tokens, seq_len, done, n_new = _append(s, new_BT, n_acc + 1, active)
        # root + accepted nodes -> positions pos0 .. pos0 + n_acc; the target cache then
        # holds seq_len - 1 entries (the new token is pending)
        tcache = compact(tcache, path_BP, n_new)
        # the draft cache must be valid below the next pos0 - 1 = pos0 + n_acc: the root
        # and the accepted non-leaf nodes, which the last level forward left at their BFS
        # slots (the last accepted node is re-fed next iteration, "lazy by one")
        dcache = compact(dcache.replace(lengths=pos0), path_BP, jnp.zeros_like(n_new))

    st = s.stats
    act = active.astype(jnp.int32)
    acc_pos = (jnp.arange(dmax)[None, :] < n_acc[:, None]).astype(jnp.int32) * act[:, None]
    uniq = st.unique_experts_L
    if routing is not None and cfg.num_experts:
        onehot = jax.nn.one_hot(routing.astype(jnp.int32), cfg.num_experts, dtype=jnp.int32)
        present_LE = jnp.einsum("BTLKE->LE", onehot) > 0
        uniq = uniq + jnp.sum(present_LE, axis=1).astype(jnp.int32)
    stats = Stats(st.iterations_B + act, st.drafted_B + tree.num_nodes * act,
                  st.accepted_B + n_acc * act, st.accepted_pos_BK + acc_pos, uniq,
                  st.verify_steps + jnp.any(active).astype(jnp.int32))
    return s.replace(tokens_BN=tokens, seq_len_B=seq_len, done_B=done, target_cache=tcache,
                     draft_cache=dcache, key_B=key_B, stats=stats)


def generate_loop(cfg: LoopConfig, target, draft, *prefill_args) -> DecodeState:
    """prefill + ``lax.while_loop`` of ``step`` until every row is done."""
    s = prefill(cfg, target, draft, *prefill_args)
    return jax.lax.while_loop(lambda s: jnp.any(~s.done_B),
                              lambda s: step(cfg, target, draft, s), s)
