"""moesd_jax: speculative decoding of Mixture-of-Experts language models in JAX/Flax."""

from moesd_jax.config import MeshConfig, ModelConfig, MoEConfig, ServeConfig, SpecConfig

__all__ = ["MeshConfig", "ModelConfig", "MoEConfig", "ServeConfig", "SpecConfig"]
__version__ = "0.1.0"
