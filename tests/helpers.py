"""Tiny models shared by tests (d <= 64, a couple of layers: compile time dominates)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moesd_jax.config import ModelConfig, MoEConfig
from moesd_jax.models import Transformer


def moe_cfg(vocab=64, experts=8, top_k=2, layers=2, d=32, max_len=128, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=4,
                       num_kv_heads=2, mlp_dim=64, max_seq_len=max_len,
                       moe=MoEConfig(num_experts=experts, top_k=top_k, expert_dim=32,
                                     **kw.pop("moe", {})), **kw)


def dense_cfg(vocab=64, layers=1, d=32, max_len=128, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=4,
                       num_kv_heads=2, mlp_dim=64, max_seq_len=max_len, **kw)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer(cfg, nnx.Rngs(seed))


def perturbed_copy(model: Transformer, scale: float, seed: int = 1) -> Transformer:
    """A copy of ``model`` with Gaussian noise (relative ``scale``) on every parameter:
    a draft that agrees with the target often, but not always."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [x + scale * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
             if x.ndim >= 2 else x for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))
