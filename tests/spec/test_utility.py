"""Utility-driven K (spec/utility.py): the controller's arithmetic, and decoding under it
stays lossless whatever it decides (K per row, plain decoding, re-tests with the draft
cache catching up)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moesd_jax.config import SpecConfig
from moesd_jax.spec import utility
from moesd_jax.spec.decoder import SpecDecoder
from moesd_jax.spec.loop import generate_loop
from tests.helpers import build, moe_cfg, perturbed_copy
from tests.spec import chisq

_loop = jax.jit(generate_loop, static_argnums=0)
UCFG = utility.UtilityConfig(candidates=(1, 2, 4), test_iters=2, set_iters=3)


def run_auto(dec, prompts, max_new, cost, ucfg=UCFG, **kw):
    prepared = dec.prepare(prompts, max_new, **kw)
    cfg = dec.loop_config([len(p) for p in prompts], [max_new] * len(prompts))
    cfg = dataclasses.replace(cfg, utility=ucfg, k=ucfg.k_max)
    return jax.block_until_ready(_loop(cfg, dec.target, dec.draft, *prepared, None, None,
                                       jnp.asarray(cost, jnp.float32)))


def test_utilities_from_a_histogram():
    u = utility.UtilityConfig(candidates=(1, 2, 4))
    hist = jnp.array([[0, 0, 0, 0, 2],  # every draft accepted twice
                      [2, 0, 0, 0, 0],  # none accepted
                      [0, 0, 0, 0, 0]])  # not tested
    cost = jnp.array([1.0, 1.5, 2.0, 2.5, 3.0])
    util = np.asarray(utility.utilities(u, hist, cost))
    np.testing.assert_allclose(util[0], [1.0, 2 / 1.5, 3 / 2.0, 4 / 2.5, 5 / 3.0], rtol=1e-6)
    np.testing.assert_allclose(util[1], [1.0, 1 / 1.5, 1 / 2.0, 1 / 2.5, 1 / 3.0], rtol=1e-6)
    assert util[2].tolist() == [1.0, 0, 0, 0, 0]
    # batch total tokens per cost here: K=0 2/1, K=1 3/1.5, K=2 4/2, K=4 6/3: a tie, so
    # the batch caps every row at K = 0 (the cheapest of the best)
    c = utility.init(u, 3, cost, jnp.array([5, 5, 5]))
    assert int(c.test_k) == 4  # the first test drafts the largest viable candidate
    assert int(utility.init(u, 3, jnp.array([1.0, 1.5, 2.0, 2.5, 5.5]),  # 5 / 5.5 < 1
                            jnp.array([5, 5, 5])).test_k) == 2
    c = c.replace(test_k=jnp.asarray(4, jnp.int32))  # here: a test at K_max
    for n_acc in ([4, 0, 1], [4, 0, 1]):
        c = utility.update(u, c, jnp.array([True, True, False]), jnp.array(n_acc))
    assert np.asarray(c.chosen_B).tolist() == [0, 0, -1]
    assert int(c.test_k) == 4  # the batch chose 0: the next test is base_k again
    # cheaper drafts: K=4 gives the batch (5 + 1) / 1.8 tokens per cost, the most
    cost = jnp.array([1.0, 1.2, 1.4, 1.6, 1.8])
    c = utility.init(u, 3, cost, jnp.array([5, 5, 5])).replace(test_k=jnp.asarray(4))
    for n_acc in ([4, 0, 1], [4, 0, 1]):  # the two test iterations
        c = utility.update(u, c, jnp.array([True, True, False]), jnp.array(n_acc))
    # row 0: K=4 (utility 5/1.8); row 1 keeps its own best, plain decoding; row 2 idle
    assert np.asarray(c.chosen_B).tolist() == [4, 0, -1]
    assert utility.decisions(c, 0) == [{"iteration": 1, "k": 4,
                                        "utility": pytest.approx(5 / 1.8)}]
    assert np.asarray(utility.draft_limits(u, c)).tolist() == [4, 0, 4]  # set phase
    assert int(c.set_len) == u.set_iters  # a row chose K > 0: no back-off
    assert int(c.test_k) == 4  # the next test drafts what the batch chose
    # every tested row choosing K = 0 doubles the next set phase, up to max_backoff
    lose = utility.UtilityConfig(candidates=(1,), test_iters=1, set_iters=2, max_backoff=4)
    c = utility.init(lose, 1, jnp.array([1.0, 1.9]), jnp.array([5]))  # could pay, loses
    lens, tests = [], 0
    for _ in range(30):
        tests += int(utility.in_test(lose, c))
        c = utility.update(lose, c, jnp.array([True]), jnp.array([0]))
        lens.append(int(c.set_len))
    assert sorted(set(lens)) == [4, 8] and tests == 4  # 1+2... then 8-iteration sets
    with pytest.raises(ValueError, match="ascending"):
        utility.UtilityConfig(candidates=(4, 2)).validate()


def test_static_batch_decides_one_k_for_its_finishing_time():
    """``update`` with ``remaining_B`` (generate's static batches): every deciding row
    drafts the K that finishes the active rows soonest (``static_batch_times``), not its
    own best; K = 0's time is the most tokens a row still needs."""
    u = utility.UtilityConfig(candidates=(1, 2, 4))
    cost = jnp.array([1.0, 1.2, 1.4, 1.6, 1.8])
    active = jnp.array([True, True, False])
    remaining = jnp.array([30, 40, 0])
    for n_acc, want in (([4, 0, 1], 4), ([0, 0, 0], 0)):
        c = utility.init(u, 3, cost, jnp.array([5, 5, 5])).replace(test_k=jnp.asarray(4))
        for _ in range(2):
            c = utility.update(u, c, active, jnp.array(n_acc), remaining)
        # throughput rule: row 0 K = 4, row 1 its own best 0 (the test above); here both
        assert np.asarray(c.chosen_B).tolist() == [want, want, -1], n_acc
    hist = jnp.array([[0, 0, 0, 0, 2], [2, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    util = utility.utilities(u, hist, cost, 4)
    decide = jnp.array([True, True, False])
    sf = utility.test_counts(hist, 4)
    t = np.asarray(utility.static_batch_times(u, util * cost[None, :], decide, sf, cost,
                                              remaining, active))
    assert t[0] == 40.0  # plain: the longest row's 40 tokens
    # by hand: g(K) = mean over rows 0, 1 of 1 + min(a, K) = (2 + K) / 2, pooled rate
    # p = 8 / (8 + 2 + 1), v(K) of 1 + min(G, K), z_2 = 1 / sqrt(pi)
    p = 8 / 11
    for k in (1, 2, 4):
        g = (2 + k) / 2
        ex = sum(p ** j for j in range(1, k + 1))
        v = sum((2 * j - 1) * p ** j for j in range(1, k + 1)) - ex * ex
        want = float(cost[k]) * (40 / g + np.sqrt(1 / np.pi) * np.sqrt(40 * v / g ** 3))
        assert t[k] == pytest.approx(want, rel=1e-4), k
    np.testing.assert_allclose(utility.max_normal_mean(3)[1:], [0, 1 / np.sqrt(np.pi),
                                                                1.5 / np.sqrt(np.pi)],
                               atol=1e-4)


def test_batch_times_see_the_straggler():
    """Host side: ``row_rates`` shrinks noise away (identical rows stay at the pooled
    rate; rows that truly differ keep most of their spread); ``batch_times`` charges a
    batch for its slowest row: a spread of rates, or more rows, makes drafting slower for
    the same mean rate, and a Monte-Carlo run of the chain's renewal process agrees with
    ``cost_model.static_batch_iterations``."""
    from moesd_jax.analysis.cost_model import chain_token_moments, static_batch_iterations

    same = [(6, 4)] * 8 + [(5, 5), (7, 3)] * 4  # binomial noise around 0.6 only
    np.testing.assert_allclose(utility.row_rates(same), 0.6, atol=0.02)
    spread = [(1, 9), (9, 1)] * 8 + [(0, 0)]  # 0.1 / 0.9 over 10 trials: real spread
    r = utility.row_rates(spread)
    assert r.shape == (16,) and r.min() < 0.2 and r.max() > 0.8
    u = utility.UtilityConfig(candidates=(1, 2, 4))
    ones = np.ones(5)
    homog = [(50, 50)] * 16  # rate 0.5 for sure
    t1 = utility.batch_times(u, ones, homog, [65], upper=False)
    t10 = utility.batch_times(u, ones, homog, [65] * 10, upper=False)
    assert t1[0] == t10[0] == 64
    # one row: 64 tokens at 1 + 0.5 + 0.25 per iteration at K = 2
    assert t1[2] == pytest.approx(64 / 1.75, rel=0.02)
    assert all(t10[k] > t1[k] * 1.05 for k in (1, 2, 4))  # ten rows: the slowest
    het = [(10, 90), (90, 10)] * 8  # the same pooled rate 0.5, spread across rows
    th = utility.batch_times(u, ones, het, [65] * 10, upper=False)
    assert all(th[k] > t10[k] * 1.2 for k in (1, 2, 4))
    # the renewal model against simulating the chain: rows at rates 0.3..0.8, K = 2
    rng = np.random.default_rng(1)
    rates = np.linspace(0.3, 0.8, 6)
    mu, var = chain_token_moments(rates, 2)
    x = np.minimum(rng.geometric(1 - rates[None, :, None], (4000, 6, 40)) - 1, 2)
    np.testing.assert_allclose(mu, 1 + x.mean(axis=(0, 2)), rtol=0.01)
    np.testing.assert_allclose(var, x.var(axis=(0, 2)), rtol=0.03)
    iters = (np.cumsum(1 + x, axis=2) < 48).sum(axis=2) + 1  # iterations to commit 48
    sim = iters.max(axis=1).mean()
    model = static_batch_iterations(np.tile(rates, (512, 1)), [48] * 6, 2)
    assert model == pytest.approx(sim, rel=0.03)


def test_utilities_beyond_the_test_k_continue_geometrically():
    """A test at K_t = 1 measures K <= 1; rows that accepted every draft continue with
    the test's acceptance rate p = S / (S + F + 1) beyond it."""
    u = utility.UtilityConfig(candidates=(1, 2, 4))
    hist = jnp.array([[0, 2, 0, 0, 0],  # two iterations, both accepted their one draft
                      [2, 0, 0, 0, 0],  # both rejected
                      [1, 1, 0, 0, 0]])  # one of each
    cost = jnp.ones(5)
    tok = np.asarray(utility.utilities(u, hist, cost, 1))
    p = 2 / 3
    np.testing.assert_allclose(tok[0], [1, 2, 2 + p, 2 + p + p**2, 2 + p + p**2 + p**3],
                               rtol=1e-6)
    np.testing.assert_allclose(tok[1], [1] * 5)
    q = 1 / 3  # S = 1, F = 1
    np.testing.assert_allclose(tok[2], [1, 1.5, 1.5 + q / 2, 1.5 + (q + q**2) / 2,
                                        1.5 + (q + q**2 + q**3) / 2], rtol=1e-6)
    # the same histogram read as a test at K_max gives the measured values only
    np.testing.assert_allclose(np.asarray(utility.utilities(u, hist, cost))[0],
                               [1, 2, 2, 2, 2])


def test_costs_one_formula():
    from moesd_jax.analysis.cost_model import iteration_costs, model_iteration_costs, preset
    from moesd_jax.config import ModelConfig, load_config

    c = iteration_costs({1: 2.0, 2: 2.5, 3: 3.0}, 0.5, 2)
    np.testing.assert_allclose(c, [1.0, (0.5 + 2.5) / 2.0, (1.0 + 3.0) / 2.0])
    cfg = load_config(ModelConfig, "mixtral-8x7b")
    m = model_iteration_costs(cfg, preset("h100"), 1, 4, draft=0.1)
    assert m[0] == 1.0 and (np.diff(m) > 0).all()


@pytest.fixture(scope="module")
def setup():
    target = build(moe_cfg(), seed=0)
    draft = perturbed_copy(target, 0.2)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 9, 9, 9], [3, 1], [5, 6, 7], [2]]
    ar = [r.token_ids for r in SpecDecoder(target, max_len=64).generate(prompts, 20)]
    dec = SpecDecoder(target, draft, SpecConfig(method="draft", k=4), max_len=64)
    return dec, prompts, ar


def test_rate_upper_is_wilson_and_tightens():
    """The optimistic rate of the plain-or-test gate: Wilson's upper end, by hand for
    s = 8, f = 2 at z = 1.645 (p = 0.8, n = 10); 1 with no counts; above the estimate and
    closer to it as counts grow at the same rate; 1 for a perfect record."""
    z, n, p = 1.645, 10, 0.8
    hand = (p + z * z / (2 * n) + z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (
        1 + z * z / n)
    assert abs(utility.rate_upper(8, 2) - hand) < 1e-9 and 0.93 < hand < 0.94
    assert utility.rate_upper(0, 0) == 1.0 and abs(utility.rate_upper(5, 0) - 1.0) < 1e-12
    ups = [utility.rate_upper(8 * m, 2 * m) for m in (1, 4, 16, 64)]
    assert all(a > b > 0.8 for a, b in zip(ups, ups[1:]))
    assert ups[-1] - 0.8 < 0.03


def test_first_viable_candidate():
    u = utility.UtilityConfig(candidates=(1, 2, 4))
    fv = lambda c: int(utility.first_viable(u, jnp.asarray(c, jnp.float32)))  # noqa: E731
    assert fv([1.0, 1.5, 2.0, 3.0, 4.0]) == 1
    assert fv([1.0, 2.5, 3.5, 4.5, 4.8]) == 4  # only K = 4 could pay: 5 / 4.8 > 1
    assert fv([1.0, 5.0, 6.0, 7.0, 8.0]) == 0  # none: never test


@pytest.mark.parametrize("regime,cost", [
    # no K could pay -> never tests (generate and the engine run the plain program there
    # instead: test_decoder_k_auto, the engine's "loses" case)
    pytest.param("speculation loses", [1.0, 5.0, 6.0, 7.0, 8.0], marks=pytest.mark.slow),
    ("only K = 4 could pay", [1.0, 2.5, 3.5, 4.5, 4.8]),  # tests draft 4; -> K = 0 or 4
    pytest.param("speculation free", [1.0] * 5, marks=pytest.mark.slow),  # -> K = 4
    ("mixed", [1.0, 1.3, 1.6, 1.9, 2.2]),  # -> per-row choices from acceptance
])
def test_auto_k_greedy_equals_ar(setup, regime, cost):
    dec, prompts, ar = setup
    s = run_auto(dec, prompts, 20, cost)
    tokens, seq = np.asarray(s.tokens_BM), np.asarray(s.seq_len_B)
    for b, p in enumerate(prompts):
        assert tokens[b, len(p): seq[b]].tolist() == ar[b], (regime, b)
    ks = {d["k"] for b in range(len(prompts)) for d in utility.decisions(s.controller, b)}
    if regime == "speculation loses":  # plain decoding throughout: no test, no draft
        assert ks == set() and int(np.asarray(s.stats.drafted_B).sum()) == 0
        assert int(s.controller.set_len) == utility.NEVER
    elif regime == "only K = 4 could pay":
        assert ks <= {0, 4} and ks
        assert int(s.controller.test_k) == 4
        # test phases only (2 of at most every 5 iterations, then rarer), 4 drafts each,
        # or rows that chose 4
        if ks == {0}:
            assert (np.asarray(s.stats.drafted_B) <= 4 * 2 * (-(-np.asarray(
                s.stats.iterations_B) // 5))).all()
    elif regime == "speculation free":  # ties go to the smaller K; rows that accept go up
        assert max(ks) >= 2
    else:
        assert len(ks) >= 1 and ks <= {0, 1, 2, 4}


def test_auto_k_sampled_is_lossless():
    target, draft = chisq.make_pair()
    ar = SpecDecoder(target, spec=SpecConfig(method="none"))
    sd = SpecDecoder(target, draft, SpecConfig(method="draft", k=2))
    n = chisq.N
    ucfg = utility.UtilityConfig(candidates=(1, 2), test_iters=1, set_iters=1)
    # per-row costs cannot differ, so mix decisions through acceptance alone
    s = run_auto(sd, [chisq.PROMPT] * n, 3, [1.0, 1.2, 1.6], ucfg, temperature=1.0,
                 seed=list(range(n)))
    toks = np.asarray(s.tokens_BM)[:, len(chisq.PROMPT): len(chisq.PROMPT) + 3]
    v = chisq.V
    got = toks[:, 0] * v * v + toks[:, 1] * v + toks[:, 2]
    chosen = np.asarray(s.controller.chosen_B)
    p = chisq.two_sample_p(got, chisq.samples(ar))
    print(f"auto K sampled: chi-square p = {p:.3f}; rows choosing K=0/1/2: "
          f"{[(chosen == k).sum() for k in (0, 1, 2)]}")
    assert p >= 1e-3


def test_decoder_k_auto(setup):
    """``SpecConfig(auto=True)`` through SpecDecoder.generate: greedy == AR and every
    row's decisions in its stats where some K could pay; where none could, generate runs
    the plain decoding program itself (no controller, no draft forward), still == AR.
    Costs come from the cost model (shape checked), then are pinned both ways."""
    dec0, prompts, ar = setup
    target = nnx_merge(dec0.target)
    draft = nnx_merge(dec0.draft)
    dec = SpecDecoder(target, draft, SpecConfig(method="draft", k=4, auto=True,
                                                auto_set_iters=4, auto_costs="model",
                                                auto_hardware="h100"), max_len=64)
    assert dec.cfg.utility.candidates == (1, 2, 4) and dec.cfg.k == 4
    costs = dec.utility_costs(len(prompts))
    assert costs[0] == 1.0 and costs.shape == (5,) and (costs[1:] > 0).all()
    lens, new = [len(p) for p in prompts], [20] * len(prompts)
    for pinned, pays in (([1.0, 1.3, 1.6, 1.9, 2.2], True), ([1.0, 5.0, 6.0, 7.0, 8.0], False)):
        dec._costs[(len(prompts), False)] = np.asarray(pinned, np.float32)
        cfg = dec.call_config(lens, new)
        assert (cfg.utility is not None) == pays and (cfg.method == "none") == (not pays)
        res = dec.generate(prompts, 20)
        assert [r.token_ids for r in res] == ar
        for r in res:
            assert bool(r.stats["utility"]) == pays, (pinned, r.stats["utility"])
            assert {d["k"] for d in r.stats["utility"]} <= {0, 1, 2, 4}
            if not pays:  # the draft model never ran
                assert r.stats["drafted"] == 0 and r.stats["draft_fed"] == 0


def test_decoder_k_auto_remembers_rates_across_calls(setup):
    """Across generate calls (one batch size): the tests' per-row acceptance counts are
    remembered; while no K would finish the static batch sooner than plain decoding at
    their optimistic bound (``utility.batch_pays``), calls decode plainly without
    testing, except every ``auto_explore_every``-th, which runs the controller (and
    refreshes the memory). Every call == AR."""
    dec0, prompts, ar = setup
    dec = SpecDecoder(nnx_merge(dec0.target), nnx_merge(dec0.draft),
                      SpecConfig(method="draft", k=4, auto=True, auto_set_iters=4,
                                 auto_explore_every=3), max_len=64)
    n = len(prompts)
    dec._costs[(n, False)] = np.asarray([1.0, 1.3, 1.6, 1.9, 2.2], np.float32)
    # warm_up compiles both programs (the controller's, its plain twin) and remembers
    # nothing; no later call below compiles again
    dec.warm_up(prompts, 20)
    assert dec.trace_count == 2 and not dec._auto_rates and not dec._auto_plain
    assert dec.auto_rate(n) is None
    first = dec.generate(prompts, 20)
    assert all(r.stats["utility"] for r in first)
    rate, upper = dec.auto_rate(n), dec.auto_rate(n, upper=True)
    assert rate is not None and 0.0 <= rate < upper <= 1.0
    mem = list(dec._auto_rates[n])
    assert len(mem) == n
    # the batch's expected iterations at each K (costs 1): break-even costs it(0) / it(K)
    it = utility.batch_times(dec.cfg.utility, np.ones(5), mem, [20] * n)
    even = [1.0] + [it[0] / it.get(k, it[4]) for k in (1, 2, 3, 4)]
    # costs at which some K pays, with the margin, at the optimistic bound: the
    # controller runs again
    m = dec.spec.auto_margin
    assert m == 0.05
    dec._costs[(n, False)] = np.asarray([1.0] + [0.99 * (1 - m) * c for c in even[1:]],
                                        np.float32)
    assert dec.call_config([len(p) for p in prompts], [20] * n).utility is not None
    # at the point estimate (upper=False) those costs need not pay: the bound is optimistic
    assert (utility.batch_times(dec.cfg.utility, np.ones(5), mem, [20] * n,
                                upper=False)[4] >= it[4])
    # ... but not by the margin: plain decoding
    dec._costs[(n, False)] = np.asarray([1.0] + [1.01 * (1 - m) * c for c in even[1:]],
                                        np.float32)
    assert dec.call_config([len(p) for p in prompts], [20] * n).utility is None
    # costs at which every K could pay only above the bound
    costs = [1.0] + [1.03 * c for c in even[1:]]
    assert all(1 + k > costs[k] for k in (1, 2, 4))  # viable with every draft accepted
    dec._costs[(n, False)] = np.asarray(costs, np.float32)
    ran = []
    for _ in range(6):
        res = dec.generate(prompts, 20)
        assert [r.token_ids for r in res] == ar
        ran.append(any(r.stats["utility"] for r in res))
    assert ran == [False, False, True, False, False, True]
    assert dec.trace_count == 2
    # auto_explore_every = 0: no memory, the controller runs every call
    dec.spec = dataclasses.replace(dec.spec, auto_explore_every=0)
    assert dec.call_config([len(p) for p in prompts], [20] * n).utility is not None


def nnx_merge(pieces):
    from flax import nnx

    return nnx.merge(*pieces)


@pytest.mark.parametrize("window", [64, 8])
def test_draft_catch_up_equals_a_fresh_prefill(window):
    """After plain-decoding iterations, the draft model's cache re-fed from each row's
    sync point (in chunks, as many as the most-lagging row needs) holds the K/V a prefill
    over the same tokens gives, below ``seq_len - 2``; a row more than ``window`` behind
    is re-fed over its last ``window`` tokens only (slots before them keep what they
    held)."""
    import types

    from flax import nnx

    from moesd_jax.spec.proposers import DraftModel

    draft = build(moe_cfg(experts=4, top_k=2, layers=2), seed=5)
    params = nnx.split(draft)
    cfg = types.SimpleNamespace(plan=None)
    b, cap = 3, 64
    tokens = jax.random.randint(jax.random.PRNGKey(0), (b, cap), 1, 64)
    seq_len = jnp.asarray([40, 23, 30], jnp.int32)
    sync = jnp.asarray([12, 23, 5], jnp.int32)  # row 1 is up to date

    def prefill(n_B):
        pos = jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32)[None], (b, cap))
        return DraftModel().init(cfg, params, tokens, pos, pos < n_B[:, None], n_B, cap)

    s = types.SimpleNamespace(tokens_BM=tokens, seq_len_B=seq_len,
                              done_B=jnp.zeros((b,), bool))
    stale = prefill(sync - 2)  # slots from sync - 2 on: never fed (garbage)
    keep = (jnp.arange(cap)[None, :] < (sync - 2)[:, None])[None, :, :, None, None]
    stale = stale.replace(k=jnp.where(keep, stale.k, 7.0), v=jnp.where(keep, stale.v, -7.0))
    got = DraftModel().catch_up(cfg, params, stale, s, sync, window)
    want = prefill(seq_len - 2)
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(seq_len - 2))
    lo = np.maximum(np.asarray(seq_len - 2) - window, np.asarray(sync - 2))
    for r in range(b):
        n = int(seq_len[r]) - 2
        if lo[r] > int(sync[r]) - 2:  # beyond the window: the gap keeps its old content
            np.testing.assert_array_equal(np.asarray(got.k[:, r, int(sync[r]) - 2:lo[r]]), 7.0)
            continue
        ok = slice(0, n)
        np.testing.assert_allclose(np.asarray(got.k[:, r, ok]), np.asarray(want.k[:, r, ok]),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.v[:, r, ok]), np.asarray(want.v[:, r, ok]),
                                   rtol=1e-5, atol=1e-5)


def test_plain_calls_size_the_cache_for_plain_decoding():
    """A --k auto call that runs the plain program sizes its cache as plain decoding does
    (no room for K drafts): here 128 slots where the auto program needs 256."""
    cfg = moe_cfg(max_len=512)
    dec = SpecDecoder(build(cfg), build(cfg, seed=1), SpecConfig(method="draft", k=4, auto=True))
    lens, n = [8, 5], 2
    room = 128 - max(lens) - 1  # max_new that fills a 128-slot cache exactly
    plain = SpecDecoder(build(cfg), spec=SpecConfig(method="none"))
    assert plain.loop_config(lens, [room] * n).max_len == 128
    assert dec.loop_config(lens, [room] * n).max_len == 256  # the auto program's
    dec._costs[(n, False)] = np.asarray([1.0, 5.0, 6.0, 7.0, 8.0], np.float32)
    assert dec.call_config(lens, [room] * n).max_len == 128


def test_prior_sets_the_test_k_and_shrinks_short_tests():
    """A prior acceptance rate (the decoder's recent calls'): tests draft the candidate it
    favours instead of the smallest viable one, and a test's expected tokens are
    ``(n * measured + w * prior_tokens) / (n + w)``, w = ``PRIOR_ITERS`` by default."""
    u = utility.UtilityConfig(candidates=(1, 2, 4))
    cost = jnp.asarray([1.0, 1.9, 2.3, 2.9, 3.5], jnp.float32)
    np.testing.assert_allclose(utility.prior_tokens(0.8, 5), [1, 1.8, 2.44, 2.952, 3.3616],
                               rtol=1e-5)
    seq = jnp.zeros((2,), jnp.int32)
    assert int(utility.init(u, 2, cost, seq).test_k) == 4  # no prior: largest viable
    c = utility.init(u, 2, cost, seq, prior=0.8)  # 2.44 / 2.3 the best: K = 2 favoured
    assert int(c.test_k) == 2 and int(c.base_k) == 2
    assert int(utility.init(u, 2, cost, seq, prior=0.3).base_k) == 4  # none pays: viable
    hist = jnp.asarray([[0, 0, 0, 0, 2], [1, 1, 0, 0, 0]], jnp.int32)  # 2 iterations at K=4
    plain = utility.utilities(u, hist, cost, 4)
    shrunk = utility.utilities(u, hist, cost, 4, jnp.float32(0.8))
    measured = plain * cost[None, :]
    want = (2 * measured + 2 * utility.prior_tokens(0.8, 5)[None, :]) / 4 / cost[None, :]
    np.testing.assert_allclose(shrunk, want, rtol=1e-5)
    np.testing.assert_allclose(utility.utilities(u, hist, cost, 4, jnp.float32(-1.0)), plain)
    np.testing.assert_allclose(utility.test_counts(hist, 4), [[8, 0], [1, 2]])
    heavy = utility.utilities(u, hist, cost, 4, jnp.float32(0.8), jnp.float32(30.0))
    want = (2 * measured + 30 * utility.prior_tokens(0.8, 5)[None, :]) / 32 / cost[None, :]
    np.testing.assert_allclose(heavy, want, rtol=1e-5)
    assert float(utility.init(u, 2, cost, seq, 0.8, 30.0).prior_w) == 30.0


def test_prior_weight_follows_the_rows_spread():
    """``prior_weight``: rows that accept alike (binomial noise only) make the pooled rate
    a heavy prior, up to ``PRIOR_ITERS`` per row and ``PRIOR_MAX_ITERS``; rows that truly
    differ leave ``PRIOR_ITERS``; in between, ``p (1 - p) / tau^2`` trials over the
    trials of one iteration at K."""
    same = [(8, 2)] * 40  # every row at 0.8 exactly: no spread
    assert utility.prior_weight(same, 4) == utility.PRIOR_MAX_ITERS
    assert utility.prior_weight(same[:3], 4) == 3 * utility.PRIOR_ITERS  # three rows
    assert utility.prior_weight(same[:1], 4) == utility.PRIOR_ITERS
    assert utility.prior_weight([(1, 9), (9, 1)] * 8, 4) == utility.PRIOR_ITERS
    rng = np.random.default_rng(0)
    rates = np.clip(rng.normal(0.6, 0.1, 400), 0, 1)  # tau = 0.1
    s = rng.binomial(400, rates)
    rows = np.stack([s, 400 - s], axis=1)
    trials = 0.6 + 0.36 + 1 - 0.36  # one iteration at K = 2, p = 0.6
    assert utility.prior_weight(rows, 2) == pytest.approx(0.24 / 0.01 / trials, rel=0.25)


def test_measured_costs_at_the_calls_shape():
    """``auto_costs: measured``: cost(K) from generate loops timed at the first call's
    shape (its longest prompt and new tokens; here a 1-token prompt, which the oracle's
    reference must still cover), K = 0 the unit, Ks between branches interpolated,
    cached per batch size."""
    dec = SpecDecoder(build(moe_cfg()), spec=SpecConfig(method="oracle", k=4, auto=True,
                                                        auto_candidates=(1, 4)), max_len=64)
    c = dec.utility_costs(2, shape=(1, 20))
    assert c.shape == (5,) and c[0] == 1.0 and (c > 0).all()
    np.testing.assert_allclose(c[2:4], np.interp([2, 3], [1, 4], [c[1], c[4]]), rtol=1e-5)
    assert dec.utility_costs(2) is c  # cached: later calls' shapes do not re-time
