"""MoE dispatch backends agree with the float32 dense reference; gather reads only the
active experts' weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moesd_jax.models import moe

E, D, F = 64, 32, 48


@pytest.fixture(scope="module")
def weights():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return (jax.random.normal(k[0], (E, D, F)) * 0.2, jax.random.normal(k[1], (E, D, F)) * 0.2,
            jax.random.normal(k[2], (E, F, D)) * 0.2)


def _routing(seed, t, k, n_active, drop_frac=0.0):
    """Random routing over only ``n_active`` experts (the rest get zero tokens)."""
    rng = np.random.default_rng(seed)
    pool = rng.choice(E, n_active, replace=False)
    ids = np.stack([rng.choice(pool, k, replace=False) for _ in range(t)]).astype(np.int32)
    w = rng.random((t, k)).astype(np.float32) + 0.1
    drop = rng.random((t, k)) < drop_frac
    ids[drop] = E
    w[drop] = 0.0
    return jnp.asarray(ids), jnp.asarray(w)


@pytest.mark.parametrize("backend", ["gather", "ragged"])
@pytest.mark.parametrize("t,k,n_active,drop", [(1, 2, 2, 0.0), (7, 4, 5, 0.3), (16, 2, 30, 0.1)])
def test_backend_matches_dense(weights, backend, t, k, n_active, drop):
    x = jax.random.normal(jax.random.PRNGKey(t), (t, D))
    ids, w = _routing(t * 13 + k, t, k, n_active, drop)
    ref = moe.dispatch_dense(x, *weights, ids, w)
    out = moe.DISPATCH[backend](x, *weights, ids, w)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_gather_with_cap_below_tokens_x_k(weights):
    # max_active = the true number of distinct experts: still exact
    x = jax.random.normal(jax.random.PRNGKey(1), (12, D))
    ids, w = _routing(3, 12, 4, 6)
    ref = moe.dispatch_dense(x, *weights, ids, w)
    out = moe.dispatch_gather(x, *weights, ids, w, max_active=6)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            subs = v if isinstance(v, (list, tuple)) else [v]
            for s in subs:
                inner = getattr(s, "jaxpr", None)
                if inner is not None:
                    yield from _walk(getattr(inner, "jaxpr", inner))


def _unstacked(weights):
    return tuple(tuple(w[i] for i in range(E)) for w in weights)


@pytest.mark.parametrize("t,k,n_active,drop", [(1, 4, 4, 0.0), (5, 4, 9, 0.2), (40, 2, 30, 0.1)])
def test_gather_unstacked_matches_dense(weights, t, k, n_active, drop):
    """The CPU layout (a tuple of per-expert arrays, read through lax.switch) is exact,
    with one row per chunk (t=1), small chunks and 8-row chunks (t=40)."""
    x = jax.random.normal(jax.random.PRNGKey(t + 7), (t, D))
    ids, w = _routing(t * 5 + k, t, k, n_active, drop)
    ref = moe.dispatch_dense(x, *weights, ids, w)
    out = jax.jit(moe.dispatch_gather)(x, *_unstacked(weights), ids, w)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_row_chunk():
    assert moe.row_chunk(1, 4, 32) == 1 and moe.row_chunk(8, 4, 32) == 1
    assert moe.row_chunk(20, 4, 32) == 4 and moe.row_chunk(64, 4, 32) == 8
    assert moe.row_chunk(1000, 8, 64) == 8


def test_unstack_and_stack_experts_round_trip():
    from flax import nnx

    from moesd_jax.config import ModelConfig, MoEConfig
    from moesd_jax.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=64, moe=MoEConfig(num_experts=8, top_k=2, expert_dim=16))
    model = Transformer(cfg, nnx.Rngs(0))
    toks = jnp.asarray([[1, 5, 9, 3]], jnp.int32)
    pos = jnp.arange(4, dtype=jnp.int32)[None]
    before = model(toks, pos, model.init_cache(1, 16))[0]
    stacked = np.asarray(model.layers[0].moe.w_gate_EDF.get_value())
    assert moe.unstack_experts(model) == 2
    w = model.layers[0].moe.w_gate_EDF.get_value()
    assert isinstance(w, tuple) and len(w) == 8 and w[3].shape == (32, 16)
    after = model(toks, pos, model.init_cache(1, 16))[0]
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-5, atol=1e-5)
    assert moe.stack_experts(model) == 2
    np.testing.assert_array_equal(np.asarray(model.layers[0].moe.w_gate_EDF.get_value()),
                                  stacked)


def test_gather_reads_only_active_experts(weights):
    """Stacked weights: every weight read is one expert's [D, F] slice inside the loop over
    active experts; no dot touches the full [64, ...] stack. Unstacked: the dots read
    per-expert arrays chosen by lax.switch, and nothing slices a weight."""
    t, k = 4, 2
    x = jnp.ones((t, D))
    ids, w = _routing(0, t, k, 8)
    eqns = list(_walk(jax.make_jaxpr(moe.dispatch_gather)(x, *weights, ids, w).jaxpr))
    assert any(e.primitive.name == "while" for e in eqns)  # run-time trip count
    slices = [tuple(e.outvars[0].aval.shape) for e in eqns if e.primitive.name == "dynamic_slice"
              and len(e.outvars[0].aval.shape) == 3]
    assert sorted(slices) == sorted([(1, D, F), (1, D, F), (1, F, D)])
    for e in eqns:
        if e.primitive.name == "dot_general":
            for v in e.invars:
                assert E not in v.aval.shape, f"dot over all experts: {v.aval.shape}"
    un = list(_walk(jax.make_jaxpr(moe.dispatch_gather)(x, *_unstacked(weights), ids,
                                                        w).jaxpr))
    switches = [e for e in un if e.primitive.name == "cond"]
    assert len(switches) == 1 and len(switches[0].params["branches"]) == E
    assert not [e for e in un if e.primitive.name == "dynamic_slice"
                and len(e.outvars[0].aval.shape) == 3]
    # the dense reference, by contrast, multiplies all 64 experts
    dense = list(_walk(jax.make_jaxpr(moe.dispatch_dense)(x, *weights, ids, w).jaxpr))
    assert any(E in v.aval.shape for e in dense if e.primitive.name == "dot_general"
               for v in e.invars)
