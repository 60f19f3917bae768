"""Initialisation keeps activations O(1): every projection preserves the scale of a
unit-RMS input, so attention starts with soft (not one-hot) weights and training with
small gradients. A too-wide init (e.g. fan-in taken from the head axis) fails here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moesd_jax.config import ModelConfig, MoEConfig
from moesd_jax.train import forward_train
from tests.helpers import build


def _cfg(d=256, heads=8, kv=4):
    return ModelConfig(vocab_size=512, d_model=d, num_layers=2, num_heads=heads,
                       num_kv_heads=kv, mlp_dim=512, max_seq_len=128,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_dim=128,
                                     shared_expert_dim=256, shared_expert_gate=True))


@pytest.mark.parametrize("d,heads,kv", [(256, 8, 4), (128, 4, 2)])
def test_projections_preserve_unit_scale(d, heads, kv):
    model = build(_cfg(d, heads, kv))
    attn = model.layers[0].attn
    x = jax.random.normal(jax.random.PRNGKey(0), (512, d))  # unit RMS rows
    for name in ("wq_DHK", "wk_DGK", "wv_DGK"):
        y = jnp.einsum("TD,DHK->THK", x, getattr(attn, name)[...].astype(jnp.float32))
        assert 0.8 < float(jnp.std(y)) < 1.25, (name, float(jnp.std(y)))
    h = jax.random.normal(jax.random.PRNGKey(1), (512, heads, d // heads))
    o = jnp.einsum("THK,HKD->TD", h, attn.wo_HKD[...].astype(jnp.float32))
    assert 0.8 < float(jnp.std(o)) < 1.25
    moe = model.layers[0].moe
    for w, xin in ((moe.w_gate_EDF, x), (moe.w_up_EDF, x)):
        y = jnp.einsum("TD,EDF->ETF", xin, w[...].astype(jnp.float32))
        assert 0.8 < float(jnp.std(y)) < 1.25


def test_fresh_model_attention_is_soft_and_loss_near_uniform():
    cfg = _cfg()
    model = build(cfg)
    attn = model.layers[0].attn
    x = jax.random.normal(jax.random.PRNGKey(0), (64, cfg.d_model))
    q = jnp.einsum("TD,DHK->HTK", x, attn.wq_DHK[...].astype(jnp.float32))
    k = jnp.einsum("TD,DGK->GTK", x, attn.wk_DGK[...].astype(jnp.float32))
    k = jnp.repeat(k, cfg.num_heads // cfg.num_kv_heads, axis=0)
    logits = jnp.einsum("HTK,HSK->HTS", q, k) / np.sqrt(cfg.dh)
    assert float(jnp.std(logits)) < 2.0  # one-hot attention would need std >> 1
    tok = jax.random.randint(jax.random.PRNGKey(2), (2, 32), 0, cfg.vocab_size)
    out, _ = forward_train(model, tok)
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out[:, :-1]), tok[:, 1:, None], -1))
    assert abs(float(ce) - np.log(cfg.vocab_size)) < 1.0

