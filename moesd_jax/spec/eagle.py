"""EAGLE-3 draft head: a one-layer drafter that reads the target's hidden states.

Architecture (EAGLE-3, Li et al. 2025; vLLM ``llama_eagle3.py``): the outputs of three
target layers (low, middle, high) are concatenated, ``[.., 3 * D]``, and projected to D by
``fc``. One decoder layer reads ``concat(input_norm(embed(token)), hidden_norm(feature))``
(X = 2 * D wide): attention with q/k/v from X over the head's own KV cache, the residual
on the feature stream, then a SwiGLU MLP; ``norm`` and ``lm_head`` give logits over the
draft vocabulary. The embedding is the target's (shared and frozen: passed in, never a
copy among the head's parameters). An optional reduced draft vocabulary maps draft id
``i`` to target id ``i + d2t[i]`` (the public checkpoints' layout; ``t2d`` marks the
target ids it covers).

Pairing. The head's entry at position p reads the target's feature f_p (which predicted
token p + 1) and the token x_{p+1}, and predicts x_{p+2}; its pre-norm output h_p is the
feature of the next entry when drafting deeper. In the loop's buffer the pending root
sits at ``pos0 = seq_len - 1`` and the target has features for positions < pos0, so:

* the root's entry is at position (and head-cache slot) ``pos0 - 1`` (f_{pos0-1}, root);
* a tree node at depth d lives at position ``pos0 - 1 + d``, slot ``pos0 - 1 + node``
  (the tree region starts at slot ``pos0``), reading its parent's h and its own token.

Resync ("correct on the next draft"). ``commit`` keeps the verify forward's features of
the accepted path (root first; after ``fc``) and the slot of its first entry, ``base``;
the next ``propose`` first feeds entry j = 0..D at slot ``base + j``: (feature of path
node j, the buffer token at ``base + j + 1``), causal. The first ``n = pos0 - base``
entries are real (the accepted path re-run with the target's own features, which
overwrites the drafted entries at those slots) and the last of them is the new root's
entry: its output drafts the root's children. Later entries write uncommitted slots that
the tree levels overwrite or never see. After the prefill, ``base = prompt_len - 1``
(n = 1: the root's entry only).

Params (``SpecDecoder``'s ``draft`` for ``spec.method == "eagle"``): ``eagle_params(head,
target)`` = ``(graphdef, {"head": nnx.State, "embed_VD": the target's table})``.
State (``DecodeState.proposer_state``): :class:`EagleState`, every leaf ``[B, ...]``.

Legend (DESIGN.md) plus X = the layer's 2 * D input width, J = D + 1 resync entries.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from moesd_jax import kv_cache
from moesd_jax.config import ConfigError
from moesd_jax.models.attention import MASK_VALUE, cached_attention
from moesd_jax.models.layers import MLP, RMSNorm, param, rope
from moesd_jax.spec import proposers
from moesd_jax.spec.proposers import Proposal, _expand, _level_tables
from moesd_jax.spec.sampling import split_rows
from moesd_jax.spec.tree import TokenTree

_DTYPES = ("float32", "bfloat16", "float16")


def default_hidden_layers(num_layers: int) -> tuple[int, int, int]:
    """Low, middle and high target layers (output indices) for a target of L layers.

    ``(1, L // 2, L - 2)`` for L >= 5 (vLLM reads the inputs of layers (2, L // 2, L - 3),
    i.e. about the same outputs); smaller targets take three distinct layers where they
    have them: (0, 1, 2) for L = 3, (1, 2, 3) for L = 4, (0, 0, 1) for L = 2.
    """
    n = num_layers
    if n >= 5:
        return (1, n // 2, n - 2)
    return {4: (1, 2, 3), 3: (0, 1, 2), 2: (0, 0, 1)}.get(n, (0, 0, 0))


@dataclasses.dataclass(frozen=True)
class EagleConfig:
    """An EAGLE-3 head for one target.

    Attributes:
      vocab_size: V of the target. d_model: D of the target (the head's width too: it
        shares the target's embedding).
      hidden_layers: the 3 target layers (output indices, low / middle / high) whose
        hidden states the head reads.
      num_heads, num_kv_heads, head_dim: the head's attention (H, G, C).
      mlp_dim: F of its SwiGLU MLP.
      draft_vocab: size of the draft vocabulary (None = V, the full vocabulary).
      rope_theta, rms_eps: as the target's.
      norm_before_residual: the residual stream starts from ``hidden_norm(feature)``
        rather than the raw feature (a public checkpoint option; default off).
      param_dtype, compute_dtype: storage and matmul dtypes.
    """

    vocab_size: int
    d_model: int
    hidden_layers: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    draft_vocab: int | None = None
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    norm_before_residual: bool = False
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    @property
    def vd(self) -> int:
        """Vd, the draft vocabulary size."""
        return self.vocab_size if self.draft_vocab is None else self.draft_vocab

    @property
    def reduced(self) -> bool:
        return self.vd < self.vocab_size

    def validate(self, prefix: str = "eagle") -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim",
                     "mlp_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be >= 1")
        if len(self.hidden_layers) != 3 or any(int(i) < 0 for i in self.hidden_layers):
            raise ConfigError(f"{prefix}.hidden_layers={self.hidden_layers} must be 3 layer "
                              "indices >= 0 (low, middle, high)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{prefix}.num_heads={self.num_heads} is not divisible by "
                              f"{prefix}.num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{prefix}.head_dim={self.head_dim} must be even for RoPE")
        if not 1 <= self.vd <= self.vocab_size:
            raise ConfigError(f"{prefix}.draft_vocab={self.draft_vocab} must be in [1, "
                              f"{prefix}.vocab_size={self.vocab_size}]")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)!r} must be one of "
                                  f"{_DTYPES}")

    @classmethod
    def for_target(cls, target_cfg, **overrides) -> EagleConfig:
        """A head shaped like one target layer (its heads, head dim and MLP width)."""
        tc = target_cfg
        base = dict(vocab_size=tc.vocab_size, d_model=tc.d_model,
                    hidden_layers=default_hidden_layers(tc.num_layers),
                    num_heads=tc.num_heads, num_kv_heads=tc.num_kv_heads, head_dim=tc.dh,
                    mlp_dim=tc.mlp_dim, rope_theta=tc.rope_theta, rms_eps=tc.rms_eps,
                    param_dtype=tc.param_dtype, compute_dtype=tc.compute_dtype)
        base.update(overrides)
        if "hidden_layers" in base:
            base["hidden_layers"] = tuple(int(i) for i in base["hidden_layers"])
        cfg = cls(**base)
        cfg.validate()
        return cfg

    def check_target(self, target_cfg) -> None:
        """Raises ValueError naming the field when the head does not fit ``target_cfg``."""
        tc = target_cfg
        if self.vocab_size != tc.vocab_size:
            raise ValueError(f"eagle.vocab_size={self.vocab_size} != target vocab_size="
                             f"{tc.vocab_size}")
        if self.d_model != tc.d_model:
            raise ValueError(f"eagle.d_model={self.d_model} != target d_model={tc.d_model}: "
                             "the head shares the target's embedding")
        bad = [i for i in self.hidden_layers if not 0 <= i < tc.num_layers]
        if bad:
            raise ValueError(f"eagle.hidden_layers={self.hidden_layers}: layer {bad[0]} is "
                             f"outside the target's [0, {tc.num_layers})")


class VocabMap(nnx.Variable):
    """A draft <-> target vocabulary map (not trained)."""


class EagleAttention(nnx.Module):
    """GQA attention whose q/k/v read the X = 2 * D input and whose output is D wide."""

    def __init__(self, cfg: EagleConfig, rngs: nnx.Rngs):
        x, d, h, g, c = 2 * cfg.d_model, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, \
            cfg.head_dim
        dt = cfg.param_dtype
        self.cfg = cfg
        self.wq_XHC = param(rngs, (x, h, c), (None, "heads", "head_dim"), dt, scale=x**-0.5)
        self.wk_XGC = param(rngs, (x, g, c), (None, "kv_heads", "head_dim"), dt, scale=x**-0.5)
        self.wv_XGC = param(rngs, (x, g, c), (None, "kv_heads", "head_dim"), dt, scale=x**-0.5)
        self.wo_HCD = param(rngs, (h, c, d), ("heads", "head_dim", "embed"), dt,
                            scale=(h * c) ** -0.5)

    def qkv(self, x_BTX, positions_BT):
        """q [B, T, H, C], k and v [B, T, G, C], RoPE applied to q and k."""
        dt = x_BTX.dtype
        q = jnp.einsum("BTX,XHC->BTHC", x_BTX, self.wq_XHC[...].astype(dt))
        k = jnp.einsum("BTX,XGC->BTGC", x_BTX, self.wk_XGC[...].astype(dt))
        v = jnp.einsum("BTX,XGC->BTGC", x_BTX, self.wv_XGC[...].astype(dt))
        theta = self.cfg.rope_theta
        return rope(q, positions_BT, theta), rope(k, positions_BT, theta), v

    def out(self, o_BTHC):
        return jnp.einsum("BTHC,HCD->BTD", o_BTHC, self.wo_HCD[...].astype(o_BTHC.dtype))

    def __call__(self, x_BTX, positions_BT, k_BSGC, v_BSGC, start_B, tree_mask=None,
                 write_offsets_T=None):
        """Writes this step's K/V at ``start_B + write_offsets_T`` and attends over the
        cache like the target's attention (``models/attention.py``). Returns (out_BTD,
        k_BSGC, v_BSGC)."""
        cfg = self.cfg
        b, t, _ = x_BTX.shape
        g, c = cfg.num_kv_heads, cfg.head_dim
        q, k, v = self.qkv(x_BTX, positions_BT)
        k_cache = kv_cache.write(k_BSGC[None], 0, k, start_B, write_offsets_T)  # L = 1
        v_cache = kv_cache.write(v_BSGC[None], 0, v, start_B, write_offsets_T)
        o = cached_attention(q.reshape(b, t, g, cfg.num_heads // g, c), k_cache, v_cache, 0,
                             start_B, tree_mask).reshape(b, t, cfg.num_heads, c)
        return self.out(o), k_cache[0], v_cache[0]


class EagleHead(nnx.Module):
    """The EAGLE-3 head. Build with ``EagleHead(cfg, nnx.Rngs(seed))``."""

    def __init__(self, cfg: EagleConfig, rngs: nnx.Rngs):
        cfg.validate()
        d, dt = cfg.d_model, cfg.param_dtype
        self.cfg = cfg
        self.fc_KD = param(rngs, (3 * d, d), (None, "embed"), dt)  # K here: the 3 * D input
        self.input_norm = RMSNorm(d, cfg.rms_eps, dt)
        self.hidden_norm = RMSNorm(d, cfg.rms_eps, dt)
        self.attn = EagleAttention(cfg, rngs)
        self.post_attn_norm = RMSNorm(d, cfg.rms_eps, dt)
        self.mlp = MLP(d, cfg.mlp_dim, dt, rngs)
        self.norm = RMSNorm(d, cfg.rms_eps, dt)
        self.lm_head_DV = param(rngs, (d, cfg.vd), ("embed", "vocab"), dt)
        if cfg.reduced:  # identity maps by default: draft id i = target id i
            self.d2t = VocabMap(jnp.zeros((cfg.vd,), jnp.int32))
            self.t2d = VocabMap(jnp.arange(cfg.vocab_size) < cfg.vd)

    # -- pieces shared by drafting and training ------------------------------------------

    def project(self, hidden_BTK: jax.Array) -> jax.Array:
        """``fc``: the target's 3 concatenated hidden states [B, T, 3 * D] -> [B, T, D]."""
        want = 3 * self.cfg.d_model
        if hidden_BTK.shape[-1] != want:
            raise ValueError(f"target features have width {hidden_BTK.shape[-1]}; the head "
                             f"reads 3 * d_model = {want} (hidden_layers="
                             f"{self.cfg.hidden_layers})")
        dt = jnp.dtype(self.cfg.compute_dtype)
        return hidden_BTK.astype(dt) @ self.fc_KD[...].astype(dt)

    def layer_inputs(self, tokens_BT, feat_BTD, embed_VD):
        """(X input [B, T, 2D], the residual stream [B, T, D])."""
        dt = jnp.dtype(self.cfg.compute_dtype)
        e = self.input_norm(jnp.take(embed_VD, tokens_BT, axis=0).astype(dt))
        f = feat_BTD.astype(dt)
        h = self.hidden_norm(f)
        return jnp.concatenate([e, h], axis=-1), (h if self.cfg.norm_before_residual else f)

    def finish(self, attn_BTD, resid_BTD):
        """Residual + MLP + final norm: (draft logits [B, T, Vd] float32, pre-norm h)."""
        r = resid_BTD + attn_BTD
        pre = r + self.mlp(self.post_attn_norm(r))
        logits = self.norm(pre) @ self.lm_head_DV[...].astype(pre.dtype)
        return logits.astype(jnp.float32), pre

    def draft_ids(self) -> jax.Array:
        """int32 [Vd]: the target id of each draft id."""
        ids = jnp.arange(self.cfg.vd, dtype=jnp.int32)
        return ids + self.d2t[...].astype(jnp.int32) if self.cfg.reduced else ids

    def target_logits(self, logits_BTV: jax.Array) -> jax.Array:
        """Draft-vocabulary logits -> the target vocabulary (ids outside it get a floor
        that softmax turns into exact zeros)."""
        if not self.cfg.reduced:
            return logits_BTV
        full = jnp.full(logits_BTV.shape[:-1] + (self.cfg.vocab_size,), MASK_VALUE,
                        logits_BTV.dtype)
        return full.at[..., self.draft_ids()].set(logits_BTV)

    def __call__(self, tokens_BT, feat_BTD, positions_BT, k_BSGC, v_BSGC, start_B, embed_VD,
                 tree_mask=None, write_offsets_T=None, outputs_BR=None):
        """One head forward over T entries (token, feature) with the cache.

        Args:
          tokens_BT: int32 target token ids. feat_BTD: features (``project`` of the
            target's, or the head's own pre-norm outputs). positions_BT: RoPE positions.
          k_BSGC, v_BSGC: the head's cache; new K/V go to ``start_B + write_offsets_T``.
          start_B: committed length per row; tree_mask: as ``models/attention.py``.
          embed_VD: the target's embedding table.
          outputs_BR: int32 entry indices whose outputs are wanted (None = all T): every
            entry writes its K/V, but only these R run the MLP and the vocabulary
            projection (the resync reads one entry of D + 1).

        Returns:
          (draft logits [B, R, Vd] float32, pre-norm h [B, R, D], k_BSGC, v_BSGC), R = T
          without ``outputs_BR``.
        """
        x, resid = self.layer_inputs(tokens_BT, feat_BTD, embed_VD)
        a, k_BSGC, v_BSGC = self.attn(x, positions_BT, k_BSGC, v_BSGC, start_B, tree_mask,
                                      write_offsets_T)
        if outputs_BR is not None:
            take = lambda z: jnp.take_along_axis(z, outputs_BR[:, :, None], axis=1)  # noqa: E731
            a, resid = take(a), take(resid)
        logits, pre = self.finish(a, resid)
        return logits, pre, k_BSGC, v_BSGC


def eagle_params(head: EagleHead, target) -> tuple:
    """The loop's ``draft`` for ``spec.method == "eagle"``: ``(graphdef, {"head": state,
    "embed_VD": the target's embedding table})`` (the table is the target's own array,
    shared, not copied). Raises ValueError when the head does not fit the target."""
    if not isinstance(head, EagleHead):
        raise ValueError(f"spec.method='eagle' needs an EagleHead as draft, got "
                         f"{type(head).__name__}")
    head.cfg.check_target(target.cfg)
    graphdef, state = nnx.split(head)
    return graphdef, {"head": state, "embed_VD": target.embed.embedding_VD[...]}


@struct.dataclass
class EagleState:
    """The head's per-row state (every leaf has the batch on axis 0).

    Attributes:
      k_BSGC, v_BSGC: the head's KV cache (one layer).
      feat_BJD: features (after ``fc``) of the entries the next draft feeds first: the
        accepted path's nodes, root first (J = tree depth + 1).
      base_B: int32 slot (= position) of the first of them.
    """

    k_BSGC: jax.Array
    v_BSGC: jax.Array
    feat_BJD: jax.Array
    base_B: jax.Array


def _merge(params):
    graphdef, w = params
    return nnx.merge(graphdef, w["head"]), w["embed_VD"]


def eagle_tokens_fed(tree: TokenTree) -> int:
    """Head entries per iteration: D + 1 resync entries, then one padded forward per
    deeper level (its nodes that have children)."""
    parents = _level_tables(tree)[0]
    return tree.depth + 1 + (tree.depth - 1) * parents.shape[1]


class Eagle(proposers.Proposer):
    """EAGLE-3 head drafting from the target's features (see the module docstring)."""

    name = "eagle"

    def hidden_layers(self, params):
        graphdef, w = params
        return tuple(nnx.merge(graphdef, w["head"]).cfg.hidden_layers)

    def init(self, cfg, params, prompts_BT, pos_BT, valid_BT, prompt_len_B, capacity,
             ref_BM=None, hidden=None):
        head, embed = _merge(params)
        hc = head.cfg
        if hidden is None:
            raise ValueError("spec method 'eagle' needs the target's hidden states")
        b, p = prompts_BT.shape
        if hidden.shape[:2] != (b, p):
            raise ValueError(f"target features of shape {hidden.shape} for prompts of shape "
                             f"{prompts_BT.shape}")
        feat = head.project(hidden)  # [B, P, D]
        dt = jnp.dtype(hc.compute_dtype)
        z = jnp.zeros((b, capacity, hc.num_kv_heads, hc.head_dim), dt)
        # entry i = (f_i, prompt token i + 1) for i < prompt_len - 1; the last one (with
        # the first sampled token) is fed by the first propose
        nxt = jnp.concatenate([prompts_BT[:, 1:], jnp.zeros((b, 1), prompts_BT.dtype)], axis=1)
        _, _, k, v = head(nxt, feat, pos_BT, z, z, jnp.zeros((b,), jnp.int32), embed)
        base = (prompt_len_B - 1).astype(jnp.int32)
        last = jnp.take_along_axis(feat, base[:, None, None], axis=1)  # [B, 1, D]
        j = cfg.accept_positions + 1
        feat_BJD = jnp.zeros((b, j, hc.d_model), dt).at[:, :1].set(last)
        return EagleState(k, v, feat_BJD, base)

    def propose(self, cfg, tree: TokenTree, params, s, active_B) -> Proposal:
        head, embed = _merge(params)
        st: EagleState = s.proposer_state
        b, nbuf = s.tokens_BM.shape
        n = tree.num_nodes
        pos0 = s.seq_len_B - 1
        j = st.feat_BJD.shape[1]
        # resync: the accepted path with the target's features, the new root's entry last
        jj = jnp.arange(j, dtype=jnp.int32)[None, :]
        base = st.base_B
        toks = jnp.take_along_axis(s.tokens_BM, jnp.clip(base[:, None] + 1 + jj, 0, nbuf - 1),
                                   axis=1)
        last = jnp.clip(pos0 - base - 1, 0, j - 1)[:, None]  # the new root's entry
        # root_logits [B, 1, Vd], root_h [B, 1, D]: only that entry runs MLP + lm_head
        root_logits, root_h, k, v = head(toks, st.feat_BJD, base[:, None] + jj, st.k_BSGC,
                                         st.v_BSGC, base, embed, outputs_BR=last)

        parents, kids, kid_parent, kid_rank = _level_tables(tree)
        w = int(tree.num_children.max())
        samp = (s.temperature_B, s.top_k_B, s.top_p_B)
        v_full = head.cfg.vocab_size
        root_tok = jnp.take_along_axis(s.tokens_BM, pos0[:, None], axis=1)
        node_tok = jnp.zeros((b, n + 1), jnp.int32).at[:, :1].set(root_tok)
        q_all = jnp.zeros((b, n + 1, v_full), jnp.float32)
        h_all = jnp.zeros((b, n + 1, root_h.shape[-1]), root_h.dtype).at[:, :1].set(root_h)
        key_B, use = split_rows(s.key_B)
        root_full = head.target_logits(root_logits)
        node_tok, q_all = _expand(jnp.broadcast_to(root_full, (b, parents.shape[1], v_full)),
                                  node_tok, q_all, parents[0], kids[0], kid_parent[0],
                                  kid_rank[0], w, *samp, use)
        state = EagleState(k, v, st.feat_BJD, base)
        if tree.depth == 1:
            return Proposal(node_tok, q_all, state, key_B, fed=eagle_tokens_fed(tree))

        feed = parents[1:]  # [D-1, P] nodes fed per level (N+1 = padding)
        feed = np.where(feed <= n, feed, n)  # padding -> the last node: a leaf, never read
        masks = tree.ancestor_mask[feed][:, :, 1:]  # region = node slots 1..N
        par_of = np.asarray(tree.parents)[feed]  # the fed nodes' parents (their features)
        depths = jnp.asarray(tree.depths)

        def level(carry, xs):
            k, v, node_tok, q_all, h_all, key_B = carry
            feed_P, par_P, mask_PN, lpar_P, kids_C, kp_C, kr_C = xs
            head, _ = _merge(params)  # merged inside the scan body, as draft_model_tree
            # node i: slot pos0 - 1 + i = region offset i - 1 from start = pos0
            lg, pre, k, v = head(node_tok[:, feed_P], h_all[:, par_P],
                                 pos0[:, None] - 1 + depths[feed_P][None, :], k, v, pos0,
                                 embed, tree_mask=mask_PN, write_offsets_T=feed_P - 1)
            h_all = h_all.at[:, feed_P].set(pre)
            key_B, use = split_rows(key_B)
            node_tok, q_all = _expand(head.target_logits(lg), node_tok, q_all, lpar_P, kids_C,
                                      kp_C, kr_C, w, *samp, use)
            return (k, v, node_tok, q_all, h_all, key_B), None

        xs = tuple(jnp.asarray(x) for x in (feed, par_of, masks, parents[1:], kids[1:],
                                             kid_parent[1:], kid_rank[1:]))
        (k, v, node_tok, q_all, _, key_B), _ = jax.lax.scan(
            level, (k, v, node_tok, q_all, h_all, key_B), xs)
        return Proposal(node_tok, q_all, EagleState(k, v, st.feat_BJD, base), key_B,
                        fed=eagle_tokens_fed(tree))

    def commit(self, cfg, tree: TokenTree, params, state, pos0_B, path_BJ, n_new_B,
               hidden=None):
        head, _ = _merge(params)
        if hidden is None:
            raise ValueError("spec method 'eagle' needs the verify forward's hidden states")
        feats = jnp.take_along_axis(hidden, path_BJ[:, :, None], axis=1)  # [B, D+1, 3D]
        feat = head.project(feats).astype(state.feat_BJD.dtype)
        moved = n_new_B > 0  # rows that committed nothing (done) keep their state
        return state.replace(feat_BJD=jnp.where(moved[:, None, None], feat, state.feat_BJD),
                             base_B=jnp.where(moved, pos0_B.astype(jnp.int32), state.base_B))


proposers.register(Eagle())

__all__ = ["EagleConfig", "EagleHead", "EagleState", "Eagle", "eagle_params",
           "default_hidden_layers", "eagle_tokens_fed"]
