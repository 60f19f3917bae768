"""Per-row draft limits inside one static K (the hook of utility-driven K): rows with
different limits in one batch stay lossless, and a masked draft position dispatches to
no expert and is not counted as drafted."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moesd_jax.config import SpecConfig
from moesd_jax.spec.decoder import SpecDecoder
from moesd_jax.spec.loop import generate_loop
from tests.helpers import build, moe_cfg, perturbed_copy
from tests.spec import chisq

_loop = jax.jit(generate_loop, static_argnums=0)


def run_limited(dec, prompts, max_new, draft_k, trace=False, **kw):
    """The decode loop with per-row draft limits ``draft_k`` (and, with ``trace``, the
    routing trace); returns the final DecodeState."""
    prepared = dec.prepare(prompts, max_new, **kw)
    cfg = dec.loop_config([len(p) for p in prompts], [max_new] * len(prompts))
    if trace:
        cfg = dataclasses.replace(cfg, trace_steps=max_new)
    return jax.block_until_ready(_loop(cfg, dec.target, dec.draft, *prepared, None,
                                       jnp.asarray(draft_k, jnp.int32)))


@pytest.fixture(scope="module")
def pair():
    target = build(moe_cfg(), seed=0)
    return target, perturbed_copy(target, 0.2)


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 9, 9, 9], [3, 1], [5, 6, 7], [2]]
LIMITS = [0, 1, 2, 4, 3, 0]


@pytest.mark.parametrize("tree", [None, "tree-7"])
def test_mixed_limits_greedy_equal_ar_and_masked_nodes_route_nowhere(pair, tree):
    target, draft = pair
    ar = [r.token_ids for r in SpecDecoder(target, max_len=64).generate(PROMPTS, 12)]
    dec = SpecDecoder(target, draft, SpecConfig(method="draft", k=4, tree=tree), max_len=64)
    s = run_limited(dec, PROMPTS, 12, LIMITS, trace=True)
    tokens, seq = np.asarray(s.tokens_BM), np.asarray(s.seq_len_B)
    it = np.asarray(s.stats.iterations_B)
    drafted = np.asarray(s.stats.drafted_B)
    trace = np.asarray(s.routing_trace)  # [S, B, T, L, K]
    depths = np.asarray(dec.cfg.token_tree.depths)
    e = target.cfg.moe.num_experts
    for b, (p, k) in enumerate(zip(PROMPTS, LIMITS)):
        assert tokens[b, len(p): seq[b]].tolist() == ar[b], (tree, b, k)
        ok = depths <= k  # the row's nodes within its limit
        assert drafted[b] == ok[1:].sum() * it[b]  # masked nodes are not drafted
        steps = trace[: it[b], b]  # [S, T, L, K]
        assert (steps[:, ~ok] == e).all()  # masked nodes: no expert in any layer
        assert (steps[:, ok] < e).all()
    assert np.asarray(s.stats.accepted_B)[[0, 5]].tolist() == [0, 0]  # limit 0 = AR


@pytest.mark.slow  # test_utility's sampled test covers mixed limits in the default run
def test_mixed_limits_sampled_are_lossless():
    """Rows with limits 0..2 (K = 2) sample the target's 3-token distribution."""
    target, draft = chisq.make_pair()
    ar = SpecDecoder(target, spec=SpecConfig(method="none"))
    sd = SpecDecoder(target, draft, SpecConfig(method="draft", k=2))
    n = chisq.N
    s = run_limited(sd, [chisq.PROMPT] * n, 3, np.arange(n) % 3, temperature=1.0,
                    seed=list(range(n)))
    toks = np.asarray(s.tokens_BM)[:, len(chisq.PROMPT): len(chisq.PROMPT) + 3]
    v = chisq.V
    got = toks[:, 0] * v * v + toks[:, 1] * v + toks[:, 2]
    p = chisq.two_sample_p(got, chisq.samples(ar))
    print(f"mixed per-row limits, chi-square p = {p:.3f}")
    assert p >= 1e-3
