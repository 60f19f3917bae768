"""Flax NNX decoder models: dense and Mixture-of-Experts."""

from moesd_jax.models.transformer import Transformer, apply, count_params

__all__ = ["Transformer", "apply", "count_params"]
