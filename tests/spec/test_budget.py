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
    target, draft = models
    ar = [r.token_ids for r in SpecDecoder(target).generate(PROMPTS, 20)]
    budgeted = _with_dispatch(target, dispatch="gather_budgeted", budget=2,
                              budget_policy="prune")
    dec = SpecDecoder(budgeted, draft, SpecConfig(method="draft", k=4))
    res = dec.generate(PROMPTS, 20)
    assert [r.token_ids for r in res] == ar
    # the tight budget really bit: cut iterations commit no bonus token, so the same
    # tokens took more iterations than without a budget (and every row still advanced)
    full = SpecDecoder(target, draft, SpecConfig(method="draft", k=4)).generate(PROMPTS, 20)
    assert sum(r.stats["iterations"] for r in res) > sum(r.stats["iterations"] for r in full)
    # the same rule on a tree, through the same step: a node that lost an expert cuts
    # the accepted path there, and greedy output is still the unbudgeted target's
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
