"""Utility-driven speculation (Cascade): per-request K, and SD switched off where it loses.

**Utility** of drafting K tokens for a request = tokens it gains per iteration / the
iteration's cost relative to a plain decode step:

    utility(K) = (1 + E[min(a, K)]) / cost(K)
    cost(K) = (K t_draft + t_target(B, K+1)) / t_target(B, 1)

with ``a`` the drafts the request accepted in a test iteration at the test's K_t (one
measurement at K_t gives every K <= K_t: a draft within the first K is accepted at K
exactly when it is at K_t, so accepting ``min(a, K)``; beyond K_t the rows that accepted
all K_t drafts continue geometrically, with the per-draft acceptance rate estimated from
the same test), and the costs timed on this device or from the cost model
(``analysis/cost_model.py``) at the batch size. ``utility(0) = 1`` (plain decoding).
Utility < 1 means speculation slows the request down.

**Phases** (one schedule for the whole batch, counted in loop iterations, so that the
batch's rows test together and the AR program runs when every row has chosen K = 0): a
*test* phase of ``test_iters`` iterations drafts K_t for every row and records each
row's accepted counts (K_t: the K the batch chose at its last decision, or when that
was 0 or at the start the candidate the prior favours (below), else the largest *viable*
candidate: K_t drafts measure acceptance up to K_t, and a test at K = 1 says little about
K = 4; a candidate is viable when it could pay at all, (1 + K) / cost(K) > 1 with every
draft accepted, and when none is, the batch never tests and decodes plainly; backing off,
below, keeps tests rare where speculation loses); at its end each row
takes the K (0 or a candidate) with the best utility for the *set* phase of
``set_iters`` iterations; then the batch re-tests. A row's K is capped at the K with the
most tokens per cost summed over the batch (the step pays for the largest K any row
drafts; a row whose own best is smaller, e.g. 0, keeps it). That is the rule where
finished rows' slots refill (the server). In ``generate``'s *static* batches the loop
runs until its slowest row is done, so the batch instead takes the K that would finish
its active rows soonest (:func:`static_batch_times`: the longest remaining row at the
rows' mean tokens per iteration, plus the expected maximum of the rows' spread) and every
deciding row drafts it: a row that decoded plainly while the others draft would pay the
drafting iteration anyway and become the straggler. When every row that was
tested chose K = 0, the next set phase is twice as long (up to ``max_backoff`` x
``set_iters``: speculation that keeps losing is re-tested ever more rarely, so its tests
cost little); any other decision resets it. A row that has not been tested yet (it
joined mid-phase) drafts K_t.

**Across calls** (``SpecDecoder.generate``, per batch size): where no candidate could
pay even with every draft accepted the call runs the plain decoding program itself; each
tested row's counts (``Controller.sf_B2``) are remembered. While no candidate K would
finish the call's static batch sooner than plain decoding, by ``SpecConfig.auto_margin``
(the controller's program costs more than a static K's), at those rows' rates
(:func:`row_rates`, shrunk toward the pooled rate) raised by the gap to an optimistic
bound of the pooled rate (:func:`rate_upper`: few counts leave it wide, so a short
unlucky test does not switch speculation off for the calls after it) (:func:`batch_pays`:
the batch waits for its slowest row, ``cost_model.static_batch_iterations``), calls
decode plainly without testing, except every ``SpecConfig.auto_explore_every``-th, which
runs the controller and refreshes the memory (a request's own test costs what a short
request gains at best).
Where one would, the rate is the controller's *prior*: tests draft the candidate it
favours, and each test's expected tokens are shrunk toward it, so that a noisy
two-iteration test does not switch a paying request off on its own. The prior weighs
what the remembered rows say it is worth (:func:`prior_weight`): where they accept
alike (a small spread ``tau^2`` across rows beyond their binomial noise), a new row is
most likely at the pooled rate and a test moves it little; where they differ (a mix of
workloads), the test decides.

**In the loop** (``loop.step``): each iteration runs the step of the largest K any active
row needs (a ``lax.switch`` over the candidates' static chains, K = 0 being plain
decoding; in ``generate`` the chosen branch loops until another is needed, so that the
KV caches are not copied through the switch every iteration); rows with a smaller K are
masked within it (``DecodeState.draft_k_B``: masked
nodes are not dispatched to experts, not counted, never accepted). While the batch
decodes plainly the draft model does not run; its cache catches up over the skipped
tokens (one window forward) when drafting resumes.

Phase lengths and candidates are ours (Cascade's are not in our copy of the paper):
test 2 iterations, set 24 (up to 8 x 24 while every row chooses K = 0), candidates
(1, 2, 4) capped at the program's K.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@dataclasses.dataclass(frozen=True)
class UtilityConfig:
    """Static controller settings (part of the compiled program's identity).

    Attributes:
      candidates: K values (> 0, ascending) a row may choose; the largest is the
        program's K_max. 0 (plain decoding) is always a choice.
      test_iters: iterations of a test phase.
      set_iters: iterations a decision holds before the batch re-tests.
      max_backoff: the longest set phase, in units of ``set_iters``, after repeated
        all-zero decisions.
      log_slots: decisions kept per row (the decision trace; the newest overwrite).
    """

    candidates: tuple[int, ...] = (1, 2, 4)
    test_iters: int = 2
    set_iters: int = 24
    max_backoff: int = 8
    log_slots: int = 16

    def validate(self) -> None:
        c = self.candidates
        if not c or list(c) != sorted(set(c)) or c[0] < 1:
            raise ValueError(f"utility candidates={c} must be distinct positive Ks, ascending")
        if min(self.test_iters, self.set_iters, self.log_slots, self.max_backoff) < 1:
            raise ValueError(f"utility test_iters={self.test_iters}, set_iters="
                             f"{self.set_iters}, log_slots={self.log_slots} and max_backoff="
                             f"{self.max_backoff} must be >= 1")

    @property
    def k_max(self) -> int:
        return self.candidates[-1]

    @property
    def branch_ks(self) -> tuple[int, ...]:
        """The static K of each ``lax.switch`` branch: 0 (plain decoding), candidates."""
        return (0,) + self.candidates


@struct.dataclass
class Controller:
    """Per-row controller state, carried in ``DecodeState.controller``.

    ``cost_K`` [K_max + 1] is the relative iteration cost of each K (cost[0] = 1);
    ``hist_BA`` [B, K_max + 1] counts the accepted drafts per iteration during the
    current test; ``chosen_B`` is the K of the set phase (-1 = not tested yet);
    ``log_BS3`` [B, S, 3] the decisions (global iteration, chosen K, its utility).
    ``iter`` counts the batch's iterations; ``phase_iter`` the iterations since the
    current test began, ``set_len`` the current set phase's length and ``test_k`` the K
    the next (or current) test drafts (batch-wide); ``sync_B`` is each row's
    ``seq_len`` when its draft state was last brought up to date; ``sf_B2`` the
    accepted drafts and the rejecting iterations its tests counted so far (the per-draft
    acceptance rate is S / (S + F)). ``prior`` is a per-draft acceptance rate expected
    before testing (the recent calls' rate, -1: none): each test's expected tokens are
    shrunk toward it by ``prior_w`` pseudo-iterations (:func:`prior_weight`), and tests
    draft ``base_k`` (the candidate the prior favours, else the largest viable one) when
    the batch chose 0.
    """

    cost_K: jax.Array
    hist_BA: jax.Array
    chosen_B: jax.Array
    util_BK: jax.Array
    log_BS3: jax.Array
    n_log_B: jax.Array
    iter: jax.Array
    sync_B: jax.Array
    sf_B2: jax.Array
    phase_iter: jax.Array
    set_len: jax.Array
    test_k: jax.Array
    prior: jax.Array
    base_k: jax.Array
    prior_w: jax.Array


RATE_Z = 1.645  # rate_upper: one-sided 95% (the plain-or-test gate across calls)
NEVER = 2**30  # a set phase that never ends: no candidate can pay, so never test
PRIOR_ITERS = 2.0  # the prior's weight in a test's expected tokens per remembered row
PRIOR_MAX_ITERS = 32.0  # ... and at most, in test iterations (prior_weight)


def prior_tokens(prior, ka: int) -> jax.Array:
    """float32 [ka]: expected tokens per iteration at K = 0..ka-1 drafts when each draft
    is accepted with probability ``prior`` (given the previous ones): ``1 + p + .. + p^K``."""
    p = jnp.clip(jnp.asarray(prior, jnp.float32), 0.0, 1.0)
    return 1.0 + jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(
        p ** jnp.arange(1, ka, dtype=jnp.float32))])


def first_viable(ucfg: UtilityConfig, cost_K) -> jax.Array:
    """int32 []: the smallest candidate K that could pay at all, utility (1 + K) / cost(K)
    > 1 with every draft accepted; 0 when none can (speculation cannot win at these
    costs, so the controller never tests: the batch decodes plainly throughout)."""
    ks = jnp.asarray(ucfg.candidates, jnp.int32)
    viable = (1.0 + ks) > jnp.take(cost_K, ks)
    return jnp.min(jnp.where(viable, ks, NEVER)).astype(jnp.int32) % NEVER


def pays_at(ucfg: UtilityConfig, cost_K, rate: float = 1.0) -> bool:
    """Host side: whether some candidate K would pay, ``expected_tokens(rate, K) >
    cost(K)``, at per-draft acceptance ``rate`` (1: every draft accepted, the test of
    :func:`first_viable`)."""
    from moesd_jax.analysis.cost_model import expected_tokens

    c = np.asarray(cost_K)
    return any(expected_tokens(rate, k) > c[k] for k in ucfg.candidates)


def rate_upper(s: float, f: float, z: float = RATE_Z) -> float:
    """Host side: an optimistic bound on a per-draft acceptance rate measured as ``s``
    accepted drafts and ``f`` rejecting iterations (the estimate is ``s / (s + f)``):
    the Wilson score interval's upper end at ``z`` standard errors over ``n = s + f``
    trials, 1 with no trials. Wide for a few counts, it tightens as ``1 / sqrt(n)``."""
    n = float(s) + float(f)
    if n <= 0:
        return 1.0
    p, z2 = float(s) / n, z * z
    centre = p + z2 / (2 * n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return float(min(1.0, (centre + half) / (1 + z2 / n)))


def _spread(counts):
    """Tested rows' counts ``[R, 2]`` (rows with none dropped) -> (pooled rate p, the rows'
    raw rates, their binomial noise ``p (1 - p) / n``, the spread across rows ``tau^2``
    by the method of moments: observed variance minus mean noise, floored at 0)."""
    c = np.asarray(counts, np.float64).reshape(-1, 2)
    c = c[c.sum(axis=1) > 0]
    n = c.sum(axis=1)
    p = c[:, 0].sum() / n.sum()
    x = c[:, 0] / n
    noise = p * (1 - p) / n
    return p, x, noise, max(float(np.mean((x - p) ** 2) - np.mean(noise)), 0.0)


def row_rates(counts) -> np.ndarray:
    """Host side: per-row per-draft acceptance rates from tested rows' counts ``[R, 2]``
    (accepted drafts S, rejecting iterations F; rows with none dropped), shrunk toward
    the pooled rate by empirical Bayes: a row's raw ``S / (S + F)`` spreads by its
    binomial noise ``p (1 - p) / n`` plus the true spread across prompts ``tau^2``, and
    moves toward the pooled ``p`` by ``noise / (tau^2 + noise)``. A short test's noise
    then does not pass for rows that differ."""
    p, x, noise, tau2 = _spread(counts)
    w = np.where(tau2 + noise > 0, tau2 / np.maximum(tau2 + noise, 1e-12), 0.0)
    return p + w * (x - p)


def prior_weight(counts, k: int) -> float:
    """Host side: the pooled rate's weight as the controller's prior, in test iterations
    at ``k`` drafts, from tested rows' counts ``[R, 2]``. A new row's rate is drawn from
    the rows' spread ``tau^2`` around the pooled ``p`` (:func:`row_rates`), which is
    worth ``p (1 - p) / tau^2`` Bernoulli trials of its own, and an iteration at ``k``
    drafts counts ``p + .. + p^k`` accepted drafts plus ``1 - p^k`` rejecting ones.
    Bounded below by ``PRIOR_ITERS`` and above by ``PRIOR_ITERS`` per remembered row (a
    spread estimated from a few rows is no evidence that they accept alike) and
    ``PRIOR_MAX_ITERS`` (tests still see a request that differs)."""
    from moesd_jax.analysis.cost_model import expected_tokens

    p, x, _, tau2 = _spread(counts)
    hi = min(PRIOR_MAX_ITERS, PRIOR_ITERS * len(x))  # >= PRIOR_ITERS: one row at least
    if tau2 <= 0:
        return float(hi)
    trials = expected_tokens(p, k) - p ** k  # accepted drafts + the chance of a rejection
    return float(np.clip(p * (1 - p) / tau2 / trials, PRIOR_ITERS, hi))


def batch_times(ucfg: UtilityConfig, cost_K, counts, max_new_B, upper: bool = True,
                samples: int = 256, seed: int = 0) -> dict[int, float]:
    """Host side: expected decode time of one static batch (``SpecDecoder.generate``:
    rows do not refill) at each K = 0 and candidate, in plain decode steps:
    ``cost(K) * E[max_r N_r(K)]`` (``cost_model.static_batch_iterations``), rows' rates
    drawn from the remembered rows' :func:`row_rates` (``samples`` bootstrap batches of
    ``len(max_new_B)`` rows). With ``upper`` every rate is raised by the gap between the
    pooled rate's optimistic bound (:func:`rate_upper`) and the pooled rate.

    The batch waits for its slowest row, so speculation must pay on the row that
    accepts least, not on the mean: on the bundled pair at batch 10, K = 1 commits 1.65
    tokens per iteration per row but the loop's 64 tokens take 42 iterations, 1.52 per
    iteration."""
    from moesd_jax.analysis.cost_model import static_batch_iterations

    c = np.asarray(counts, np.float64).reshape(-1, 2)
    rates = row_rates(c)
    if upper:
        s, f = c.sum(axis=0)
        rates = np.clip(rates + rate_upper(s, f) - s / (s + f), 0.0, 1.0)
    n = np.maximum(np.asarray(max_new_B, np.float64) - 1, 0)  # the first: from prefill
    draw = np.random.default_rng(seed).choice(rates, (samples, len(n)))
    cost = np.asarray(cost_K, np.float64)
    return {k: float(cost[k]) * static_batch_iterations(draw, n, k, seed)
            for k in ucfg.branch_ks}


def batch_pays(ucfg: UtilityConfig, cost_K, counts, max_new_B, upper: bool = True,
               margin: float = 0.0) -> bool:
    """Host side: whether some candidate K would finish the static batch sooner than
    plain decoding, by at least ``margin`` of plain decoding's time (:func:`batch_times`)."""
    t = batch_times(ucfg, cost_K, counts, max_new_B, upper)
    return min(t[k] for k in ucfg.candidates) < (1.0 - margin) * t[0]


def init(ucfg: UtilityConfig, batch: int, cost_K, seq_len_B, prior=None,
         prior_weight=None) -> Controller:
    """The controller at prefill. ``prior``: the expected per-draft acceptance rate (-1 or
    None: none); ``prior_weight``: its weight in test iterations (:func:`prior_weight`;
    default ``PRIOR_ITERS``)."""
    ka = ucfg.k_max + 1
    cost = jnp.asarray(cost_K, jnp.float32)
    if cost.shape != (ka,):
        raise ValueError(f"cost_K has shape {cost.shape}; need ({ka},) for K = 0..{ka - 1}")
    prior = jnp.asarray(-1.0 if prior is None else prior, jnp.float32)
    prior_w = jnp.asarray(PRIOR_ITERS if prior_weight is None else prior_weight, jnp.float32)
    k0 = first_viable(ucfg, cost)
    never = k0 == 0  # skip the test phase for good; every row at K = 0
    ks = jnp.asarray(ucfg.candidates, jnp.int32)
    # the largest viable candidate: a test's drafts at K_t measure acceptance up to K_t
    k_hi = jnp.max(jnp.where(1.0 + ks > jnp.take(cost, ks), ks, 0)).astype(jnp.int32)
    u_prior = jnp.take(prior_tokens(prior, ka), ks) / jnp.take(cost, ks)
    base = jnp.where((prior >= 0) & (jnp.max(u_prior) > 1.0), jnp.take(ks, jnp.argmax(u_prior)),
                     k_hi).astype(jnp.int32)
    return Controller(cost, jnp.zeros((batch, ka), jnp.int32),
                      jnp.full((batch,), -1, jnp.int32), jnp.zeros((batch, ka), jnp.float32),
                      jnp.zeros((batch, ucfg.log_slots, 3), jnp.float32),
                      jnp.zeros((batch,), jnp.int32), jnp.zeros((), jnp.int32),
                      jnp.asarray(seq_len_B, jnp.int32), jnp.zeros((batch, 2), jnp.float32),
                      jnp.where(never, ucfg.test_iters, 0).astype(jnp.int32),
                      jnp.where(never, NEVER, ucfg.set_iters).astype(jnp.int32), base, prior,
                      jnp.copy(base),  # two buffers: a state that is donated holds both
                      prior_w)


def in_test(ucfg: UtilityConfig, c: Controller) -> jax.Array:
    return c.phase_iter < ucfg.test_iters


def draft_limits(ucfg: UtilityConfig, c: Controller) -> jax.Array:
    """int32 [B]: each row's K this iteration (the test's K_t while testing or untested)."""
    return jnp.where(in_test(ucfg, c) | (c.chosen_B < 0), c.test_k, c.chosen_B)


def test_counts(hist_BA, test_k) -> jax.Array:
    """float32 [B, 2]: a test's accepted drafts S and the iterations F that rejected one
    of their ``test_k`` drafts."""
    a = jnp.arange(hist_BA.shape[1])
    h = hist_BA.astype(jnp.float32)
    return jnp.stack([h @ a.astype(jnp.float32),
                      jnp.sum(jnp.where(a[None, :] < test_k, h, 0.0), axis=1)], axis=1)


def utilities(ucfg: UtilityConfig, hist_BA, cost_K, test_k=None, prior=None,
              prior_w=PRIOR_ITERS) -> jax.Array:
    """float32 [B, K_max + 1]: utility(K) for K = 0..K_max from a test's histogram of
    accepted drafts at ``test_k`` drafts (default K_max) per iteration (rows with no test
    iterations: utility(0) = 1, others 0).

    Up to ``test_k`` the expected tokens are measured: ``1 + E[min(a, K)]``. Beyond it,
    the share of iterations that accepted all ``test_k`` drafts continues with
    ``p + p^2 + ...``, ``p = S / (S + F + 1)`` the per-draft acceptance rate of the test
    (S accepted drafts, F iterations that rejected one; the +1 keeps a short perfect test
    from promising certainty). With a ``prior`` rate (>= 0) the expected tokens are then
    ``(n * measured + w * prior_tokens) / (n + w)`` over the test's n iterations, ``w`` =
    ``prior_w`` (:func:`prior_weight`): a two-iteration test moves a good prior but does
    not overturn it alone.
    """
    ka = ucfg.k_max + 1
    test_k = ucfg.k_max if test_k is None else test_k
    a = jnp.arange(ka)
    h = hist_BA.astype(jnp.float32)
    n = jnp.sum(h, axis=1, keepdims=True)
    capped = jnp.minimum(a[:, None], a[None, :])  # [K, a]: min(a, K)
    tokens = 1.0 + (h @ capped.T.astype(jnp.float32)) / jnp.maximum(n, 1)
    sf = test_counts(hist_BA, test_k)
    p = sf[:, 0] / (sf[:, 0] + sf[:, 1] + 1.0)
    full = jnp.take(h, test_k, axis=1) / jnp.maximum(n[:, 0], 1)  # accepted all K_t
    geo = jnp.cumsum(p[:, None] ** jnp.arange(1, ka, dtype=jnp.float32)[None, :], axis=1)
    beyond = jnp.take(geo, jnp.clip(a - test_k - 1, 0, ka - 2), axis=1)  # [B, K]
    tokens = tokens + jnp.where(a[None, :] > test_k, full[:, None] * beyond, 0.0)
    if prior is not None:
        pt = prior_tokens(prior, ka)[None, :]
        tokens = jnp.where(prior >= 0, (n * tokens + prior_w * pt) / (n + prior_w), tokens)
    util = tokens / cost_K[None, :]
    return jnp.where(n > 0, util, jnp.where(a[None, :] == 0, 1.0, 0.0))


def max_normal_mean(n: int) -> np.ndarray:
    """float64 [n + 1]: ``E[max of m iid standard normals]`` for m = 0..n (0 for m <= 1),
    by quadrature of ``m x phi(x) Phi(x)^(m - 1)``."""
    from math import erf

    x = np.linspace(-8.0, 8.0, 4001)
    phi = np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    cdf = 0.5 * (1 + np.vectorize(erf)(x / np.sqrt(2)))
    out = np.zeros(n + 1)
    for m in range(2, n + 1):
        out[m] = np.sum(x * m * phi * cdf ** (m - 1)) * (x[1] - x[0])
    return out


def static_batch_times(ucfg: UtilityConfig, tokens_BK, decide_B, sf_B2, cost_K,
                       remaining_B, active_B) -> jax.Array:
    """float32 [K_max + 1]: expected time, in plain decode steps, for the active rows of
    a static batch (no refill: the loop ends with its slowest row) to finish at each K:
    ``cost(K) (R / g + z_n sqrt(R v / g^3))``, R the most tokens an active row still
    needs, g the mean over the deciding rows of their expected tokens per iteration
    (``tokens_BK``), v the variance of one iteration's tokens at their pooled per-draft
    rate (``cost_model.chain_token_moments``) and ``z_n`` the expected maximum of n
    standard normals over the n active rows (renewal counts, normal approximation: the
    host side's ``static_batch_iterations``). K = 0: R."""
    from moesd_jax.analysis.cost_model import chain_token_moments

    d = decide_B.astype(jnp.float32)
    g = jnp.sum(tokens_BK * d[:, None], axis=0) / jnp.maximum(jnp.sum(d), 1.0)
    s_f = jnp.sum(sf_B2 * d[:, None], axis=0)
    p = s_f[0] / (s_f[0] + s_f[1] + 1.0)
    var = jnp.stack([chain_token_moments(p, k, jnp)[1] for k in range(ucfg.k_max + 1)])
    z = jnp.asarray(max_normal_mean(active_B.shape[0]), jnp.float32)
    zn = jnp.take(z, jnp.sum(active_B.astype(jnp.int32)))
    r = jnp.max(jnp.where(active_B, remaining_B, 0)).astype(jnp.float32)
    g = jnp.maximum(g, 1.0)
    t = cost_K * (r / g + zn * jnp.sqrt(r * var / g ** 3))
    return t.at[0].set(r)


def update(ucfg: UtilityConfig, c: Controller, active_B, n_acc_B, remaining_B=None
           ) -> Controller:
    """After one iteration: record the test's accepted counts; at a test's end, each row
    that took part picks the best K (0 or a candidate) for the set phase and logs it.

    ``remaining_B`` (tokens each row still needs; ``generate``'s static batches, where
    the loop runs until its slowest row is done): the batch's K is the one that would
    finish the active rows soonest (:func:`static_batch_times`) and every deciding row
    drafts it, since a row that decodes plainly while others draft pays the drafting
    iteration anyway and becomes the batch's straggler. Without it (a server whose slots
    refill), rows maximise tokens per cost as below."""
    testing = in_test(ucfg, c)
    ka = ucfg.k_max + 1
    add = (testing & active_B)[:, None] & (jnp.arange(ka)[None, :] == n_acc_B[:, None])
    hist = c.hist_BA + add.astype(jnp.int32)
    last = testing & (c.phase_iter == ucfg.test_iters - 1)
    util = utilities(ucfg, hist, c.cost_K, c.test_k, c.prior, c.prior_w)
    allowed = np.zeros(ka, bool)
    allowed[list(ucfg.branch_ks)] = True
    ok = jnp.asarray(allowed)[None, :]
    decide = last & (jnp.sum(hist, axis=1) > 0)
    own = jnp.argmax(jnp.where(ok, util, -1.0), axis=1)
    # the batch pays for the largest K any row drafts: cap every row at the K with the
    # most tokens per cost summed over the tested rows (a row whose own best is smaller,
    # e.g. 0, keeps it and masks its drafts)
    tokens_BK = util * c.cost_K[None, :]
    batch = jnp.sum(jnp.where(decide[:, None], tokens_BK, 0.0), axis=0) / c.cost_K
    cap = jnp.argmax(jnp.where(ok[0], batch, -1.0))
    best = jnp.minimum(own, cap)
    if remaining_B is not None:
        times = static_batch_times(ucfg, tokens_BK, decide, test_counts(hist, c.test_k),
                                   c.cost_K, remaining_B, active_B)
        cap = jnp.argmin(jnp.where(ok[0], times, jnp.inf))
        best = jnp.broadcast_to(cap, own.shape)
    chosen = jnp.where(decide, best.astype(jnp.int32), c.chosen_B)
    rows = jnp.arange(active_B.shape[0])
    entry = jnp.stack([jnp.broadcast_to(c.iter.astype(jnp.float32), best.shape),
                       best.astype(jnp.float32), util[rows, best]], axis=1)
    slot = jnp.where(decide, c.n_log_B % ucfg.log_slots, ucfg.log_slots)
    log = c.log_BS3.at[rows, slot].set(entry, mode="drop")
    # back off while speculation keeps losing for every tested row
    all_zero = jnp.any(decide) & jnp.all(jnp.where(decide, best == 0, True))
    set_len = jnp.where(last, jnp.where(all_zero, jnp.minimum(
        2 * c.set_len, ucfg.max_backoff * ucfg.set_iters), ucfg.set_iters), c.set_len)
    phase = jnp.minimum(c.phase_iter + 1, NEVER)
    phase = jnp.where(phase >= ucfg.test_iters + set_len, 0, phase)
    # the next test drafts what the batch chose (base_k if 0: the prior's favourite or
    # the largest viable candidate)
    any_decided = jnp.any(decide)
    test_k = jnp.where(any_decided, jnp.maximum(cap, c.base_k), c.test_k)
    return c.replace(hist_BA=jnp.where(last, 0, hist), chosen_B=chosen,
                     util_BK=jnp.where(decide[:, None], util, c.util_BK), log_BS3=log,
                     sf_B2=c.sf_B2 + jnp.where(decide[:, None], test_counts(hist, c.test_k), 0.0),
                     n_log_B=c.n_log_B + decide.astype(jnp.int32), iter=c.iter + 1,
                     phase_iter=phase.astype(jnp.int32), set_len=set_len.astype(jnp.int32),
                     test_k=test_k.astype(jnp.int32))


def decisions(c: Controller, row: int) -> list[dict]:
    """The row's decision trace, oldest first (host side)."""
    n = int(c.n_log_B[row])
    log = np.asarray(c.log_BS3[row])
    s = log.shape[0]
    idx = [(i % s) for i in range(max(0, n - s), n)]
    return [{"iteration": int(log[i, 0]), "k": int(log[i, 1]), "utility": float(log[i, 2])}
            for i in idx]
