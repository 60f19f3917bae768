"""Budgeted dispatch: Pallas kernel (TPU kernel and GPU kernel, interpreted) vs the jnp
reference, plus the policy semantics checked directly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesd_jax.pallas import budgeted_dispatch as bd
from moesd_jax.pallas import ops

T, E, K = 10, 12, 2
HYP = settings(max_examples=10, deadline=None)
BLOCK_ROWS = {"cpu": 8, "gpu": 16}


def softmax_probs(logits):
    return jnp.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


@st.composite
def router_inputs(draw, has_root):
    """probs [T, E] concentrated on a random 'hot' subset (so the natural active set
    falls below, at or above the budget), optional exact ties, padding tokens, a root."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    hot = rng.permutation(E)[: draw(st.integers(K, E))]
    logits = rng.standard_normal((T, E)) * 2.0
    if draw(st.booleans()):
        logits = np.round(logits)  # exact ties inside rows
    cold = np.setdiff1d(np.arange(E), hot)
    logits[:, cold] = -30.0  # tiny, equal probabilities: exact mass ties among cold experts
    valid = rng.random(T) >= draw(st.sampled_from([0.0, 0.3]))
    valid[0] = True
    root = None
    if has_root:
        root = np.zeros(T, bool)
        root[draw(st.sampled_from(np.flatnonzero(valid).tolist()))] = True
    return softmax_probs(logits), jnp.asarray(valid), None if root is None else jnp.asarray(root)


def dispatch(probs, valid, root, *, backend, policy, budget, norm, block_rows=8, mass=None):
    return bd.budgeted_dispatch(probs, top_k=K, budget=budget, policy=policy,
                                norm_topk_prob=norm, token_valid_T=valid, root_T=root,
                                block_rows=block_rows, backend=backend,
                                interpret=None if backend in ("cpu", "xla") else True,
                                mass_fraction=mass)


def assert_plans_equal(got, ref):
    assert got.max_active == ref.max_active
    for name in ("kept_A", "kept_E", "num_kept", "ids_TK", "alive_T"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
    for name in ("slot_TK", "tile_expert_N", "num_used_tiles"):
        np.testing.assert_array_equal(getattr(got.layout, name), getattr(ref.layout, name),
                                      err_msg=name)
    np.testing.assert_allclose(got.combine_TK, ref.combine_TK, rtol=1e-6, atol=1e-7)


# Static configurations (each one compiles once; hypothesis then draws only data):
# every backend x policy, budgets 3 and 7, norm on/off, root on/off and the mass-fraction
# selection (last field; None = top-B) all covered.
CONFIGS = [
    ("cpu", "prune", 3, False, True, None),
    ("cpu", "prune", 7, True, False, None),
    ("cpu", "substitute", 3, True, True, None),
    ("cpu", "substitute", 7, False, False, None),
    ("cpu", "truncate", 3, True, True, None),
    ("cpu", "substitute", 7, True, False, 0.6),
    ("gpu", "prune", 3, True, False, None),
    ("gpu", "prune", 7, False, True, None),
    ("gpu", "substitute", 3, False, False, None),
    ("gpu", "substitute", 7, True, True, None),
    ("gpu", "truncate", 7, False, False, None),
    ("gpu", "truncate", 7, True, True, 0.9),
]


@pytest.mark.parametrize("backend, policy, budget, norm, has_root, mass", CONFIGS)
@HYP
@given(data=st.data())
def test_kernel_matches_reference(backend, policy, budget, norm, has_root, mass, data):
    probs, valid, root = data.draw(router_inputs(has_root))
    kw = dict(policy=policy, budget=budget, norm=norm, block_rows=BLOCK_ROWS[backend],
              mass=mass)
    got = dispatch(probs, valid, root, backend=backend, **kw)
    ref = dispatch(probs, valid, root, backend="xla", **kw)
    assert_plans_equal(got, ref)
    check_policy_semantics(got, probs, valid, root, policy=policy, budget=budget, norm=norm,
                           mass=mass)


def check_policy_semantics(plan, probs, valid, root, *, policy, budget, norm, mass=None):
    """The documented contract, checked from first principles."""
    probs, valid = np.asarray(probs), np.asarray(valid)
    ids, combine = np.asarray(plan.ids_TK), np.asarray(plan.combine_TK)
    alive, kept_E = np.asarray(plan.alive_T), np.asarray(plan.kept_E)
    a = plan.max_active
    assert a == min(E, budget + (K if root is not None else 0))
    # kept_A lists exactly the kept set, padded with E.
    kept_A = np.asarray(plan.kept_A)
    assert set(kept_A[kept_A < E].tolist()) == set(np.flatnonzero(kept_E).tolist())
    assert np.all(kept_A[int(plan.num_kept):] == E)
    # Top-B by mass over valid tokens are kept (unless the cap pushed them out).
    mass_E = np.where(valid[:, None], probs, 0.0).sum(0)
    if root is None:
        n = int(plan.num_kept)
        assert np.all(mass_E[kept_E] >= mass_E[~kept_E].max(initial=-1.0) - 1e-6)
        if mass is None:
            assert n == min(budget, E)
        else:  # the shortest mass-ordered prefix covering the fraction, in [K, B]
            cum = np.cumsum(np.sort(mass_E)[::-1])
            goal = mass * mass_E.sum()
            assert K <= n <= budget
            assert n == K or cum[n - 2] < goal * (1 + 1e-5)
            assert n == budget or cum[n - 1] >= goal * (1 - 1e-5)
    else:
        r = int(np.flatnonzero(np.asarray(root))[0])
        root_experts = np.argsort(-probs[r], kind="stable")[:K]
        assert kept_E[root_experts].all() and alive[r]
    # Dropped assignments have zero weight; routed ones use kept experts only.
    assert np.all(combine[ids == E] == 0.0)
    assert np.all(kept_E[ids[ids < E]])
    assert not np.any(alive & ~valid) and np.all(ids[~valid] == E)
    nat_ids, nat_w = (np.asarray(v) for v in bd.route_topk(jnp.asarray(probs), K, norm))
    if policy == "prune":
        expect_alive = valid & kept_E[nat_ids].all(axis=1)
        np.testing.assert_array_equal(alive, expect_alive)
        np.testing.assert_array_equal(ids[alive], nat_ids[alive])
        np.testing.assert_allclose(combine[alive], nat_w[alive], rtol=1e-6)
        assert np.all(ids[~alive] == E)
    elif policy == "truncate":  # natural experts that are kept, natural weights
        np.testing.assert_array_equal(alive, valid)
        keep = valid[:, None] & kept_E[nat_ids]
        np.testing.assert_array_equal(ids, np.where(keep, nat_ids, E))
        raw = np.take_along_axis(probs, nat_ids, axis=1) * keep
        if norm:
            s = raw.sum(1, keepdims=True)
            raw = np.where(s > 0, raw / np.where(s > 0, s, 1.0), 0.0)
        np.testing.assert_allclose(combine, raw, rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_array_equal(alive, valid)
        n_routed = (ids[valid] < E).sum(axis=1)
        assert np.all(n_routed == min(K, int(plan.num_kept)))
        if norm:
            np.testing.assert_allclose(combine[valid].sum(axis=1), 1.0, rtol=1e-5)
        else:
            routed = ids < E
            np.testing.assert_array_equal(
                combine[routed], probs[np.nonzero(routed)[0], ids[routed]])


def hot_probs(n_hot, seed=0):
    """Probabilities whose natural top-K over all tokens uses exactly n_hot experts."""
    rng = np.random.default_rng(seed)
    logits = np.full((T, E), -30.0)
    hot = np.arange(n_hot)
    logits[:, hot] = rng.standard_normal((T, n_hot))
    # Make each hot expert some token's favourite so all n_hot are in the natural set.
    logits[np.arange(n_hot), hot] = 10.0
    probs = softmax_probs(logits)
    assert len(np.unique(np.asarray(bd.route_topk(probs, K, False)[0]))) == n_hot
    return probs


# These reuse the compiled no-root CONFIGS above (budget 7): prune+norm, substitute.
@pytest.mark.parametrize("n_hot, regime", [(9, "below"), (7, "equal"), (5, "above")])
def test_budget_regimes(n_hot, regime):
    probs, valid = hot_probs(n_hot), jnp.ones((T,), bool)
    for policy, norm in (("prune", True), ("substitute", False)):
        nat_ids, nat_w = bd.route_topk(probs, K, norm)
        plan = dispatch(probs, valid, None, backend="cpu", policy=policy, budget=7,
                        norm=norm)
        natural = bool(np.array_equal(plan.ids_TK, nat_ids))
        if regime == "below":
            assert not natural and int(plan.num_kept) == 7
            if policy == "prune":
                assert 0 < int(plan.alive_T.sum()) < T
        else:
            assert natural and bool(plan.alive_T.all())
            assert int(plan.num_kept) == 7  # B experts kept even if some carry ~no mass
            np.testing.assert_allclose(plan.combine_TK, nat_w, rtol=1e-6)


def test_root_keeps_its_experts_beyond_budget():
    """Tokens 0-8 prefer experts 0-3; the root (token 9) prefers the low-mass 10 and 11."""
    logits = np.full((T, E), -5.0)
    logits[:9, :4] = np.random.default_rng(1).standard_normal((9, 4)) + 3.0
    logits[9, 10:] = [4.0, 3.0]
    probs = softmax_probs(logits)
    root = jnp.zeros((T,), bool).at[9].set(True)
    plan = dispatch(probs, jnp.ones((T,), bool), root, backend="cpu", policy="prune",
                    budget=3, norm=False)
    assert plan.max_active == 3 + K
    np.testing.assert_array_equal(plan.kept_A[:2], [10, 11])  # roots first
    assert set(np.asarray(plan.kept_A)[2:].tolist()) <= {0, 1, 2, 3}
    assert int(plan.num_kept) == 5 and bool(plan.alive_T[9])
    np.testing.assert_array_equal(plan.ids_TK[9], [10, 11])


def test_invalid_tokens_carry_no_mass():
    probs = hot_probs(9, seed=2)
    valid = jnp.arange(T) < 6
    noisy = probs.at[6:].set(softmax_probs(np.random.default_rng(0).standard_normal((4, E))))
    plans = [dispatch(p, valid, None, backend="cpu", policy="substitute", budget=7,
                      norm=False) for p in (probs, noisy)]
    np.testing.assert_array_equal(plans[0].kept_A, plans[1].kept_A)
    assert np.all(np.asarray(plans[1].ids_TK)[6:] == E)


def test_route_topk_matches_numpy():
    probs = softmax_probs(np.random.default_rng(3).standard_normal((T, E)))
    ids, w = bd.route_topk(probs, 3, True)
    p = np.asarray(probs)
    order = np.argsort(-p, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(ids, order)
    top = np.take_along_axis(p, order, axis=1)
    np.testing.assert_allclose(w, top / top.sum(1, keepdims=True), rtol=1e-6)


def test_prune_plan_through_expert_ffn_is_lossless():
    """Alive tokens get exactly the natural-routing output; the plan's layout feeds the
    expert-gather kernel directly."""
    d, f = 32, 64
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((T, d)), jnp.float32)
    w = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-2]), jnp.float32)
         for s in ((E, d, f), (E, d, f), (E, f, d))]
    probs = hot_probs(9, seed=4)
    plan = dispatch(probs, jnp.ones((T,), bool), None, backend="cpu", policy="prune",
                    budget=7, norm=True)
    alive = np.asarray(plan.alive_T)
    assert 0 < alive.sum() < T
    y = ops.expert_ffn(x, *w, plan.ids_TK, plan.combine_TK, max_active=plan.max_active,
                       backend="cpu", layout=plan.layout)
    y_natural = ops.expert_ffn_ref(x, *w, *bd.route_topk(probs, K, True))
    np.testing.assert_allclose(np.asarray(y)[alive], np.asarray(y_natural)[alive],
                               rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(y)[~alive] == 0.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=E + 1), r"top_k must be in \[1, E=12\]"),
    (dict(budget=0), "budget must be >= 1"),
    (dict(policy="drop"), "policy must be one of"),
    (dict(token_valid_T=jnp.ones((T + 1,), bool)), r"token_valid_T must have shape \[T\]"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(block_rows=0), "block_rows must be >= 1"),
    (dict(mass_fraction=0.0), r"mass_fraction must be in \(0, 1\]"),
])
def test_validation_errors(kwargs, match):
    base = dict(top_k=K, budget=3, policy="prune", norm_topk_prob=False, backend="cpu")
    with pytest.raises(ValueError, match=match):
        bd.budgeted_dispatch(jnp.full((T, E), 1.0 / E), **dict(base, **kwargs))


def _one_hot_routing(experts_per_token, e=E):
    """probs whose top-K per token are the listed experts (first listed = largest)."""
    logits = np.full((len(experts_per_token), e), -8.0)
    for t, ids in enumerate(experts_per_token):
        for r, x in enumerate(ids):
            logits[t, x] = 4.0 - r
    return softmax_probs(logits)


def test_path_selection_covers_the_likeliest_prefix():
    """Root (token 0) on experts {0, 1}; draft tokens 1..4 in priority order 1 > 2 > 3 > 4
    route to {2, 3}, {3, 4}, {5, 6}, {2, 4}. B = 3: tokens 1 and 2 fit ({2, 3, 4}), token 3
    would make 5, so it is dropped; token 4 ({2, 4}) is covered anyway and stays alive.
    Mass-based top-B would pick other experts and kill token 1 or 2."""
    routes = [(0, 1), (2, 3), (3, 4), (5, 6), (2, 4)]
    probs = _one_hot_routing(routes)
    t = len(routes)
    root = jnp.arange(t) == 0
    valid = jnp.ones((t,), bool)
    prio = jnp.asarray([0.0, -0.1, -0.2, -0.3, -0.4])
    plan = bd.budgeted_dispatch(probs, top_k=K, budget=3, policy="prune",
                                norm_topk_prob=False, token_valid_T=valid, root_T=root,
                                backend="xla", priority_T=prio)
    kept = set(np.flatnonzero(np.asarray(plan.kept_E)).tolist())
    assert kept == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(np.asarray(plan.kept_A)[:2], [0, 1])  # roots first
    np.testing.assert_array_equal(plan.alive_T, [True, True, True, False, True])
    # priorities reversed: token 4 goes first ({2, 4}), token 3 would make 4 > 3: stop;
    # the free slot goes to the expert with most mass left, 3, which revives tokens 1, 2
    plan = bd.budgeted_dispatch(probs, top_k=K, budget=3, policy="prune",
                                norm_topk_prob=False, token_valid_T=valid, root_T=root,
                                backend="xla", priority_T=-prio)
    np.testing.assert_array_equal(plan.alive_T, [True, True, True, False, True])
    np.testing.assert_array_equal(np.asarray(plan.kept_A), [0, 1, 2, 4, 3])
    # leftover slots are filled by mass; B = E keeps everything alive
    plan = bd.budgeted_dispatch(probs, top_k=K, budget=E, policy="prune",
                                norm_topk_prob=False, token_valid_T=valid, root_T=root,
                                backend="xla", priority_T=prio)
    assert bool(jnp.all(plan.alive_T))
    with pytest.raises(ValueError, match="mass_fraction"):
        bd.budgeted_dispatch(probs, top_k=K, budget=3, policy="prune", norm_topk_prob=False,
                             root_T=root, backend="xla", priority_T=prio, mass_fraction=0.5)
