"""Decoder-only transformer (dense or MoE FFN per layer) over a static KV cache.

``Transformer.__call__(tokens_BT, positions_BT, cache, tree_mask=...)`` writes the T new
tokens' K/V at ``cache.lengths`` and returns float32 logits ``[B, T, V]``, the cache with
the new entries written but ``lengths`` unchanged (the caller commits what it accepts),
and optionally the routed expert ids ``[B, T, L_moe, K]`` int16 (vLLM's
``routed_experts`` convention; only MoE layers appear).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moesd_jax.config import ModelConfig
from moesd_jax.kv_cache import KVCache
from moesd_jax.models.attention import Attention
from moesd_jax.models.layers import MLP, Embed, RMSNorm, param
from moesd_jax.models.moe import MoEBlock


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.layer = layer
        self.is_moe = cfg.is_moe_layer(layer)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.param_dtype)
        self.attn = Attention(cfg, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.param_dtype)
        if self.is_moe:
            self.moe = MoEBlock(cfg, rngs)
        else:
            self.mlp = MLP(cfg.d_model, cfg.mlp_dim, cfg.param_dtype, rngs)

    def __call__(self, x_BTD, positions_BT, k_cache, v_cache, start_B, tree_mask,
                 token_valid_BT, dispatch, root_BT=None, write_offsets_T=None, plan=None,
                 stats_valid_BT=None, priority_BT=None):
        b, t, d = x_BTD.shape
        with jax.named_scope("attention"):
            a, k_cache, v_cache = self.attn(self.attn_norm(x_BTD), positions_BT, k_cache,
                                            v_cache, self.layer, start_B, tree_mask,
                                            write_offsets_T)
        x_BTD = x_BTD + a
        h = self.ffn_norm(x_BTD)
        ids, stats = None, None
        if self.is_moe:
            valid = None if token_valid_BT is None else token_valid_BT.reshape(b * t)
            root = None if root_BT is None else root_BT.reshape(b * t)
            sv = None if stats_valid_BT is None else stats_valid_BT.reshape(b * t)
            pr = None if priority_BT is None else priority_BT.reshape(b * t)
            y, ids, stats = self.moe(h.reshape(b * t, d), valid, dispatch, root, plan,
                                     stats_valid_T=sv, return_stats=True, priority_T=pr)
            y = y.reshape(b, t, d)
            ids = ids.reshape(b, t, -1)
        else:
            with jax.named_scope("mlp"):
                y = self.mlp(h)
        return x_BTD + y, k_cache, v_cache, ids, stats


class Transformer(nnx.Module):
    """The model. Build with ``Transformer(cfg, nnx.Rngs(seed))``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, cfg.param_dtype, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head_DV = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                    cfg.param_dtype)

    def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        cfg = self.cfg
        return KVCache.init(cfg.num_layers, batch, max_len or cfg.max_seq_len,
                            cfg.num_kv_heads, cfg.dh, jnp.dtype(cfg.compute_dtype))

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache, *,
                 tree_mask: jax.Array | None = None, token_valid_BT: jax.Array | None = None,
                 return_routing: bool = False, dispatch: str | None = None,
                 root_BT: jax.Array | None = None, write_offsets_T: jax.Array | None = None,
                 hidden_layers: tuple[int, ...] | None = None, plan=None,
                 return_budget_stats: bool = False, priority_BT: jax.Array | None = None):
        """Forward T new tokens per row.

        Args:
          tokens_BT: int32 token ids.
          positions_BT: int32 RoPE positions (tree nodes: length + depth).
          cache: KV cache; new entries are written at ``cache.lengths + write_offsets_T``.
          tree_mask: bool [T, W] or [B, T, W]: which slots of the tree region
            ``[lengths, lengths + W)`` each new token sees (its ancestors and itself);
            slots below ``lengths`` are always visible. None = causal ``[T, T]``.
          token_valid_BT: bool; False tokens (padding, masked drafts) dispatch to no
            expert. Their outputs are meaningless.
          return_routing: also return routed expert ids.
          dispatch: override ``MoEConfig.dispatch`` for this call.
          root_BT: bool; each row's root (pending) token, which keeps its natural experts
            under a ``*_budgeted`` dispatch.
          write_offsets_T: int32 [T] region offsets of the new tokens' K/V (default
            ``[0, T)``); a tree drafter writes one level's nodes at their node slots.
          hidden_layers: static layer indices whose output hidden states are returned too
            (a feature-level drafter such as EAGLE reads them from the verify forward).
          plan: the ``sharding.ShardingPlan`` the parameters are laid out by; MoE layers
            dispatch expert-parallel when it shards experts. None = one device.
          return_budget_stats: also return per-MoE-layer expert-budget statistics.
          priority_BT: float; under a budgeted dispatch, each token's chance of being
            accepted (a draft node's path log-probability): the budget then covers the
            likeliest tokens first (``budgeted_dispatch`` path selection).

        Under a lossless (``prune``) budgeted dispatch with ``root_BT`` given (a
        verification forward), a token that lost an expert in one MoE layer is dropped,
        with every token that has it as an ancestor (``tree_mask``; causal for chains),
        from the later layers' dispatch: its hidden state is no longer the target's, so
        loading experts for it would be wasted (the spec loop prunes it anyway).

        Returns:
          (logits_BTV float32, cache with K/V written and lengths unchanged,
           routing int16 [B, T, L_moe, K] or None), plus, with ``hidden_layers``, the
           hidden states ``[B, T, len(hidden_layers) * D]`` in the compute dtype, plus,
           with ``return_budget_stats``, float32 [L_moe, 3] (``MoEBlock`` ``return_stats``:
           natural distinct experts, loaded routing mass, total routing mass; zeros
           without a budget).
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.compute_dtype)
        x = self.embed(tokens_BT, dt)
        k_cache, v_cache, start = cache.k, cache.v, cache.lengths
        routing, bstats = [], []
        hidden = {}
        prune = self._prunes(dispatch, root_BT, tree_mask, tokens_BT.shape)
        valid = token_valid_BT
        if prune and valid is None:
            valid = jnp.ones(tokens_BT.shape, jnp.bool_)
        for i, layer in enumerate(self.layers):
            x, k_cache, v_cache, ids, st = layer(x, positions_BT, k_cache, v_cache, start,
                                                 tree_mask, valid, dispatch, root_BT,
                                                 write_offsets_T, plan, token_valid_BT,
                                                 priority_BT)
            if ids is not None:
                routing.append(ids)
                bstats.append(st)
                if prune:  # drop tokens that lost an expert, and their descendants
                    e = cfg.moe.num_experts
                    dead_BT = valid & jnp.any(ids >= e, axis=-1)
                    anc = (jnp.tril(jnp.ones((tokens_BT.shape[1],) * 2, jnp.bool_))
                           if tree_mask is None else tree_mask.astype(jnp.bool_))
                    anc_BTT = jnp.broadcast_to(anc, (tokens_BT.shape[0],) + anc.shape[-2:])
                    valid = valid & ~jnp.any(anc_BTT & dead_BT[:, None, :], axis=-1)
            if hidden_layers is not None and i in hidden_layers:
                hidden[i] = x
        x = self.final_norm(x)
        with jax.named_scope("lm_head"):
            if cfg.tie_embeddings:
                logits = self.embed.attend(x)
            else:
                logits = x @ self.lm_head_DV[...].astype(dt)
        new_cache = cache.replace(k=k_cache, v=v_cache)
        rt = None
        if return_routing and routing:
            rt = jnp.stack(routing, axis=2).astype(jnp.int16)
        extra = ()
        if return_budget_stats:
            extra = (jnp.stack(bstats) if bstats else jnp.zeros((0, 3), jnp.float32),)
        if hidden_layers is not None:
            bad = [i for i in hidden_layers if not 0 <= i < cfg.num_layers]
            if bad:
                raise ValueError(f"hidden_layers={list(hidden_layers)}: layer {bad[0]} is "
                                 f"outside [0, {cfg.num_layers})")
            feats = jnp.concatenate([hidden[i] for i in hidden_layers], axis=-1)
            return (logits.astype(jnp.float32), new_cache, rt, feats) + extra
        return (logits.astype(jnp.float32), new_cache, rt) + extra

    def _prunes(self, dispatch, root_BT, tree_mask, shape_BT) -> bool:
        """Whether this forward is a lossless-budget verification (static)."""
        m = self.cfg.moe
        name = dispatch or (m.dispatch if m is not None else "")
        return (m is not None and name.endswith("_budgeted") and m.budget_policy == "prune"
                and root_BT is not None and shape_BT[1] > 1
                and (tree_mask is None or tree_mask.shape[-1] == shape_BT[1]))


def apply(graphdef, state, *args, **kwargs):
    """Pure-function forward over ``nnx.split(model)`` (for ``jax.jit`` hot paths)."""
    return nnx.merge(graphdef, state)(*args, **kwargs)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_bytes(model: nnx.Module) -> int:
    """Bytes of ``model``'s parameters as they are resident now."""
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def resident_dtype(model: nnx.Module) -> str | None:
    """The dtype ``model``'s parameters are resident in (its first parameter's; the
    loaders cast all of them together), None for a module without parameters."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return str(leaves[0].dtype) if leaves else None
