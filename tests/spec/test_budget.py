"""Budgeted dispatch in the MoE block and the spec loop.

``prune`` (lossless): greedy SD under a tight budget still equals greedy AR.
``substitute`` (MoE-Spec): lossy, but never loads more than B experts for draft tokens.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moesd_jax.config import ConfigError, MoEConfig, SpecConfig
from moesd_jax.spec.decoder import SpecDecoder
from tests.helpers import build, moe_cfg, perturbed_copy

PROMPTS = [[5, 9, 2, 7, 1], [3, 4, 5, 6] * 4 + [3], [8] * 9]


def _with_dispatch(model, **moe_kw):
    graphdef, state = nnx.split(model)
    cfg = model.cfg
    new_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe_kw))
    new_cfg.validate()
    m = nnx.merge(graphdef, state)
    m.cfg = new_cfg
    for layer in m.layers:
        layer.attn.cfg = new_cfg
        if layer.is_moe:
            layer.moe.cfg = new_cfg
    return m


@pytest.fixture(scope="module")
def models():
    target = build(moe_cfg(experts=16, top_k=2), seed=0)
    draft = perturbed_copy(build(moe_cfg(experts=16, top_k=2), seed=0), 0.2)
    return target, draft


def test_prune_budget_is_lossless(models):
    """The lossless rule on a tree through the one step: a node that lost an expert cuts
    the accepted path there, greedy output is still the unbudgeted target's, and the tight
    budget really bit (cut iterations commit no bonus token, so the same tokens took more
    iterations). Chains: test_lossless_greedy_equals_ar_and_caps_experts."""
    target, draft = models
    ar = [r.token_ids for r in SpecDecoder(target).generate(PROMPTS, 20)]
    budgeted = _with_dispatch(target, dispatch="gather_budgeted", budget=2,
                              budget_policy="prune")
    tree = SpecDecoder(budgeted, draft, SpecConfig(method="draft", tree="tree-7"))
    res = tree.generate(PROMPTS, 20)
    assert [r.token_ids for r in res] == ar
    full = SpecDecoder(target, draft, SpecConfig(method="draft", tree="tree-7"))
    assert (sum(r.stats["iterations"] for r in res)
            > sum(r.stats["iterations"] for r in full.generate(PROMPTS, 20)))


def test_moe_block_budget_caps_loaded_experts(models):
    target, _ = models
    t = 24
    x = jax.random.normal(jax.random.PRNGKey(0), (t, target.cfg.d_model))
    root = jnp.arange(t) == 0
    for policy in ("prune", "substitute"):
        m = _with_dispatch(target, dispatch="dense_budgeted", budget=3, budget_policy=policy)
        block = m.layers[0].moe
        _, ids = block(x, None, None, root)
        ids = np.asarray(ids)
        draft_experts = set(ids[1:].ravel()) - {16}
        root_experts = set(ids[0].ravel())
        assert len(draft_experts - root_experts) <= 3, policy
        _, nat_ids, _ = block.route(x)
        assert set(ids[0]) == set(np.asarray(nat_ids)[0])  # root keeps its experts
        if policy == "prune":  # tokens are never rerouted: kept or fully dropped
            nat = np.asarray(nat_ids)
            for row, nrow in zip(ids[1:], nat[1:]):
                assert (row == 16).all() or sorted(row) == sorted(nrow)
        else:
            assert (ids[1:] < 16).all()


def test_budget_config_errors():
    with pytest.raises(ConfigError, match="needs moe.budget"):
        MoEConfig(dispatch="gather_budgeted").validate()
    with pytest.raises(ConfigError, match="moe.budget=1"):
        MoEConfig(top_k=2, budget=1).validate()


# --------------------------------------------------------------------------------------
# SpecConfig.budget (spec/budget.py): the user-facing policies through SpecDecoder

from moesd_jax.analysis import routing as routing_mod  # noqa: E402
from moesd_jax.config import BudgetConfig  # noqa: E402
from moesd_jax.spec import budget as spec_budget  # noqa: E402

E, TOPK, NEW = 16, 2, 16
SHAPES = {"chain4": {"k": 4}, "tree-31": {"tree": "tree-31"}, "tree-63": {"tree": "tree-63"}}


def _spec(shape, **budget):
    return SpecConfig(method="draft", budget=BudgetConfig(**budget), **SHAPES[shape])


@pytest.fixture(scope="module")
def ar16(models):
    return [r.token_ids for r in SpecDecoder(models[0]).generate(PROMPTS, NEW)]


def _traced(models, spec, **kw):
    """(results, per-row traces [S, T, L, K]) of one budgeted SD run."""
    dec = SpecDecoder(models[0], models[1], spec)
    traces, res = routing_mod.record_traces(dec, PROMPTS, NEW, **kw)
    # record_traces builds results without the budget entry; take it from a plain run
    return res, traces, dec


def _max_unique_per_row(traces):
    return max(float(routing_mod.unique_per_step(t, E).max()) for t in traces)


def _check_lossless(models, ar16, shape, b):
    res, traces, dec = _traced(models, _spec(shape, policy="lossless", b=b))
    assert [r.token_ids for r in res] == ar16, (shape, b)
    # every row loads at most B experts for its drafts plus its root's own top-k
    assert _max_unique_per_row(traces) <= b + TOPK, (shape, b)
    full = dec.generate(PROMPTS, NEW)
    bst = full[0].stats["budget"]
    # batch-wide: B for the drafts plus each row's root top-k
    assert max(bst["unique_experts_per_layer"]) <= b + TOPK * len(PROMPTS)
    assert bst["unique_experts"] <= bst["natural_unique_experts"] + 1e-9
    if b == E:  # nothing can be pruned: the same program as no budget, token for token
        assert sum(r.stats["budget"]["nodes_pruned"] for r in full) == 0
    return full


FAST_LOSSLESS = [("chain4", TOPK)]  # (tree-7 by default: test_prune_budget_is_lossless)
FULL_LOSSLESS = [(s, b) for s in SHAPES for b in (TOPK, 6, E) if (s, b) not in FAST_LOSSLESS]


@pytest.mark.parametrize("shape, b", FAST_LOSSLESS)
def test_lossless_greedy_equals_ar_and_caps_experts(models, ar16, shape, b):
    res = _check_lossless(models, ar16, shape, b)
    if b < E:  # the budget bit
        assert sum(r.stats["budget"]["nodes_pruned"] for r in res) > 0


@pytest.mark.slow
@pytest.mark.parametrize("shape, b", FULL_LOSSLESS)
def test_lossless_greedy_equals_ar_full_grid(models, ar16, shape, b):
    _check_lossless(models, ar16, shape, b)


@pytest.mark.slow  # sampled lossless in the default run: the chi-square test below
@pytest.mark.parametrize("shape", ["chain4", "tree-31"])
def test_lossless_sampled_at_full_budget_is_the_unbudgeted_run(models, shape):
    """Same seeds, B = E: token for token the unbudgeted sampled output. (Below E a cut
    iteration commits no bonus token, so the random stream shifts: there losslessness is
    a distribution statement, tested by chi-square below.)"""
    kw = dict(temperature=0.9, seed=[3, 4, 5])
    base = SpecDecoder(models[0], models[1], _spec(shape)).generate(PROMPTS, NEW, **kw)
    got = SpecDecoder(models[0], models[1], _spec(shape, policy="lossless", b=E)).generate(
        PROMPTS, NEW, **kw)
    assert [r.token_ids for r in got] == [r.token_ids for r in base]


@pytest.mark.parametrize("spec_kw", [dict(k=2), pytest.param(dict(tree="tree-15"),
                                                              marks=pytest.mark.slow)])
def test_lossless_sampled_matches_target_distribution(spec_kw):
    """Chi-square (tests/spec/chisq.py): a tight lossless budget (B = top_k = 2 of 8
    experts, kept set chosen over the whole 20k-row batch, so most draft nodes are
    pruned) samples exactly the target's distribution."""
    from tests.spec.chisq import make_pair, samples, two_sample_p

    target, draft = make_pair()
    ar = samples(SpecDecoder(target, max_len=16, prompt_bucket=4))
    spec = SpecConfig(method="draft", budget=BudgetConfig(policy="lossless", b=2), **spec_kw)
    p = two_sample_p(ar, samples(SpecDecoder(target, draft, spec, max_len=32,
                                             prompt_bucket=4)))
    assert p >= 0.001, p


@pytest.mark.parametrize("shape", ["chain4", pytest.param("tree-31", marks=pytest.mark.slow)])
def test_moe_spec_at_full_budget_is_bit_identical(models, shape):
    for kw in ({}, dict(temperature=0.9, seed=[3, 4, 5])):
        base = SpecDecoder(models[0], models[1], _spec(shape)).generate(PROMPTS, NEW, **kw)
        got = SpecDecoder(models[0], models[1], _spec(shape, policy="moe_spec", b=E)
                          ).generate(PROMPTS, NEW, **kw)
        assert [r.token_ids for r in got] == [r.token_ids for r in base], kw
        assert [r.stats["accepted"] for r in got] == [r.stats["accepted"] for r in base]


@pytest.mark.parametrize("shape", ["chain4", pytest.param("tree-31", marks=pytest.mark.slow)])
def test_moe_spec_unique_experts_fall_to_b(models, ar16, shape):
    """As B falls, experts loaded per layer fall to B (+ roots); the result reports
    acceptance and agreement with unbudgeted greedy output."""
    seen = []
    for b in (E, TOPK):
        res, traces, _ = _traced(models, _spec(shape, policy="moe_spec", b=b))
        per_row = _max_unique_per_row(traces)
        assert per_row <= b + TOPK
        agree = spec_budget.agreement([r.token_ids for r in res], ar16)
        acc = np.mean([r.mean_acceptance_length for r in res])
        seen.append((b, per_row, agree, acc))
        if b == E:
            assert agree == 1.0
    assert seen[0][1] > seen[-1][1]  # the tight budget really loads fewer experts
    print("B, max unique/row/layer, agreement, acceptance:", seen)


@pytest.mark.parametrize("budget", [dict(policy="moe_spec", b=4, truncate=True),
                                    dict(policy="mass", b=6, mass=0.5)])
def test_lossy_variants_cap_experts(models, budget):
    res, traces, _ = _traced(models, _spec("chain4", **budget))
    assert _max_unique_per_row(traces) <= budget["b"] + TOPK
    assert all(len(r.token_ids) == NEW for r in res)


def test_plain_steps_and_prefill_are_unbudgeted(models, ar16):
    """A budget on an AR decoder changes nothing (no verification forward), and the
    caller's model keeps its own config."""
    target = models[0]
    before = target.cfg
    dec = SpecDecoder(target, spec=SpecConfig(method="none",
                                             budget=BudgetConfig(policy="lossless", b=2)))
    res = dec.generate(PROMPTS, NEW)
    assert [r.token_ids for r in res] == ar16
    assert "budget" not in res[0].stats
    assert target.cfg is before and target.cfg.moe.budget is None


@pytest.fixture(scope="module")
def small_target():
    return build(moe_cfg(experts=4, top_k=2, layers=1), seed=3)


def _gate(target, min_agreement):
    spec = SpecConfig(method="ngram", k=2, budget=BudgetConfig(
        policy="moe_spec", b=2, min_agreement=min_agreement))
    return spec_budget.calibrate(target, None, spec, PROMPTS, 12)


def test_quality_gate_walks_the_ladder(small_target):
    """moe_spec at B = E (4) is exact, so a gate of 1.0 stops at B = 4 at the latest;
    each rejected rung agreed less than asked, and the chosen one at least as much."""
    gate = _gate(small_target, 1.0)
    assert [t[:2] for t in gate.tried] == [("moe_spec", 2), ("moe_spec", 4)][:len(gate.tried)]
    assert all(a < 1.0 for _, _, a in gate.tried[:-1]) and gate.agreement == 1.0
    assert (gate.budget.policy, gate.budget.b) == gate.tried[-1][:2]
    assert gate.budget.min_agreement == 1.0
    lax = _gate(small_target, 0.0)
    assert (lax.budget.policy, lax.budget.b, len(lax.tried)) == ("moe_spec", 2, 1)


def test_quality_gate_falls_back_to_lossless(small_target, monkeypatch):
    monkeypatch.setattr(spec_budget, "agreement", lambda got, ref: 0.25)  # never enough
    gate = _gate(small_target, 0.5)
    assert [t[:2] for t in gate.tried] == [("moe_spec", 2), ("moe_spec", 4), ("lossless", 2)]
    assert (gate.budget.policy, gate.budget.b) == ("lossless", 2)


def test_gate_ladder_and_agreement():
    ladder = spec_budget.candidates(BudgetConfig(policy="moe_spec", b=3), 16)
    assert [(c.policy, c.b) for c in ladder] == [("moe_spec", 3), ("moe_spec", 6),
                                                 ("moe_spec", 12), ("moe_spec", 16),
                                                 ("lossless", 3)]
    assert spec_budget.agreement([[1, 2, 3], [4]], [[1, 2, 4], [4, 5]]) == 3 / 5


@pytest.mark.parametrize("budget, match", [
    (dict(policy="greedy"), r"spec.budget.policy='greedy' must be one of"),
    (dict(policy="lossless"), r"spec.budget.policy='lossless' needs spec.budget.b"),
    (dict(policy="mass", mass=0.0), r"spec.budget.mass=0.0 must be in \(0, 1\]"),
    (dict(policy="lossless", b=2, truncate=True), "truncate goes with policy moe_spec"),
    (dict(policy="moe_spec", b=0), r"spec.budget.b=0 must be a positive integer"),
])
def test_budget_config_validation(budget, match):
    with pytest.raises(ConfigError, match=match):
        SpecConfig(budget=BudgetConfig(**budget)).validate()


def test_budget_against_the_target(models):
    with pytest.raises(ConfigError, match=r"spec.budget.b=17 must be in \[top_k=2, "
                                          r"num_experts=16\]"):
        SpecDecoder(models[0], models[1], _spec("chain4", policy="lossless", b=17))
    from tests.helpers import dense_cfg

    with pytest.raises(ConfigError, match="the target is dense"):
        SpecDecoder(build(dense_cfg()), spec=SpecConfig(
            method="none", budget=BudgetConfig(policy="moe_spec", b=2)))


def test_node_priority_is_the_path_log_probability():
    from moesd_jax.spec.loop import node_priority
    from moesd_jax.spec.tree import load_tree

    tree = load_tree("tree-15")
    b, t, v = 2, tree.num_nodes + 1, 16
    rng = np.random.default_rng(0)
    q = rng.random((b, t, v)).astype(np.float32)
    q /= q.sum(-1, keepdims=True)
    tok = rng.integers(0, v, (b, t)).astype(np.int32)
    got = np.asarray(node_priority(tree, jnp.asarray(tok), jnp.asarray(q)))
    for row in range(b):
        for i in range(1, t):
            want, j = 0.0, i
            while j > 0:  # walk up the path
                par = int(tree.parents[j])
                want += np.log(q[row, par, tok[row, j]]) - np.log1p(tree.ranks[j])
                j = par
            assert got[row, i] == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert got[row, 0] == 0.0
        assert all(got[row, i] <= got[row, int(tree.parents[i])] + 1e-6 for i in range(1, t))
    # a deterministic proposer: the rank prior alone; a chain: all zero (index order)
    det = np.asarray(node_priority(tree, jnp.asarray(tok)))
    assert det[0, 1] == 0.0 and det.min() < 0.0
    from moesd_jax.spec.tree import TokenTree

    chain = TokenTree(((0,), (0, 0), (0, 0, 0)))
    assert np.all(np.asarray(node_priority(chain, jnp.zeros((1, 4), jnp.int32))) == 0.0)
