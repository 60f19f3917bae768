"""Basic layers: parameters with logical axes, RMSNorm, RoPE, SwiGLU MLP, embeddings.

Legend (DESIGN.md): B batch, T tokens, S cache length, D model dim, F ffn dim, V vocab,
H heads, G kv heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype: str, init: str = "normal", scale: float | None = None) -> nnx.Param:
    """A parameter tagged with logical axis names (mapped to mesh axes by sharding.py).

    Args:
      rngs: random stream (None only for ``init`` = ``ones`` / ``zeros``).
      shape: parameter shape.
      axes: one logical axis name (or None) per dimension, e.g. ("expert", "embed", "mlp").
      dtype: storage dtype name.
      init: ``normal`` (std = scale or fan_in**-0.5), ``ones`` or ``zeros``.
    """
    assert len(shape) == len(axes), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        fan_in = shape[-2] if len(shape) >= 2 else shape[-1]
        std = scale if scale is not None else fan_in**-0.5
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    """RMSNorm as in HF Llama: normalise in float32, then scale by ``weight``."""

    def __init__(self, dim: int, eps: float, dtype: str, axis_name: str = "norm"):
        self.weight = param(None, (dim,), (axis_name,), dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(var + self.eps)
        w = self.weight[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (w * y).astype(x.dtype)


def rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, HF "rotate_half" convention (first half / second half pairs)."""
    dh = x_BTHD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))  # [Dh/2]
    ang_BTd = positions_BT.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    ang_BTD = jnp.concatenate([ang_BTd, ang_BTd], axis=-1)
    cos = jnp.cos(ang_BTD)[:, :, None, :]
    sin = jnp.sin(ang_BTD)[:, :, None, :]
    xf = x_BTHD.astype(jnp.float32)
    x1, x2 = xf[..., : dh // 2], xf[..., dh // 2 :]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rot * sin).astype(x_BTHD.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, d: int, f: int, dtype: str, rngs: nnx.Rngs, axes: str = "mlp"):
        self.w_gate_DF = param(rngs, (d, f), ("embed", axes), dtype)
        self.w_up_DF = param(rngs, (d, f), ("embed", axes), dtype)
        self.w_down_FD = param(rngs, (f, d), (axes, "embed"), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        g = x @ self.w_gate_DF[...].astype(dt)
        u = x @ self.w_up_DF[...].astype(dt)
        return (jax.nn.silu(g) * u) @ self.w_down_FD[...].astype(dt)


class Embed(nnx.Module):
    """Token embedding table [V, D]; ``attend`` is the tied LM head."""

    def __init__(self, v: int, d: int, dtype: str, rngs: nnx.Rngs):
        self.embedding_VD = param(rngs, (v, d), ("vocab", "embed"), dtype, scale=0.02)

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.embedding_VD[...], tokens, axis=0).astype(dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        return jnp.einsum("BTD,VD->BTV", x_BTD, self.embedding_VD[...].astype(x_BTD.dtype))
