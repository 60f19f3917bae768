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


def test_gather_reads_only_active_experts(weights):
    """With T=4 tokens and top-2 on 64 experts, A = 8 slots each read ONE expert's
    [D, F] weights; no dot touches the full [64, ...] stack."""
    t, k = 4, 2
    x = jnp.ones((t, D))
    ids, w = _routing(0, t, k, 8)
    jaxpr = jax.make_jaxpr(moe.dispatch_gather)(x, *weights, ids, w).jaxpr
    eqns = list(_walk(jaxpr))
    scans = [e for e in eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == t * k  # A = min(E, T*K) = 8
    slices = [tuple(e.outvars[0].aval.shape) for e in eqns if e.primitive.name == "dynamic_slice"
              and len(e.outvars[0].aval.shape) == 3]
    assert sorted(slices) == sorted([(1, D, F), (1, D, F), (1, F, D)])
    for e in eqns:
        if e.primitive.name == "dot_general":
            for v in e.invars:
                assert E not in v.aval.shape, f"dot over all experts: {v.aval.shape}"
    # the dense reference, by contrast, multiplies all 64 experts
    dense = list(_walk(jax.make_jaxpr(moe.dispatch_dense)(x, *weights, ids, w).jaxpr))
    assert any(E in v.aval.shape for e in dense if e.primitive.name == "dot_general"
               for v in e.invars)
