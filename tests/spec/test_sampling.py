"""Sampled SD has exactly the target's distribution (chi-square, two-sample).

A batch of N rows with different seeds generates 3 tokens from the same prompt, with AR
and with SD (K = 2). The joint distribution of the 3 tokens must agree (p >= 0.001);
a deliberately broken acceptance rule must make the same test fail (p < 0.001).
"""

import numpy as np
import pytest
from scipy import stats

import moesd_jax.spec.loop as loop_mod
from moesd_jax.config import SpecConfig
from moesd_jax.spec import sampling
from moesd_jax.spec.decoder import SpecDecoder
from tests.helpers import build, dense_cfg, moe_cfg

N = 20_000
V = 8
PROMPT = [1, 2, 3]


def _sharpen(model, factor):
    # random init gives near-uniform next-token distributions; sharpen them so a wrong
    # acceptance rule is detectable
    model.lm_head_DV[...] = model.lm_head_DV[...] * factor
    return model


@pytest.fixture(scope="module")
def pair():
    target = _sharpen(build(moe_cfg(vocab=V, layers=1, d=16, max_len=16), seed=0), 6.0)
    draft = _sharpen(build(dense_cfg(vocab=V, d=16, max_len=16), seed=5), 6.0)
    return target, draft


def _samples(dec) -> np.ndarray:
    res = dec.generate([PROMPT] * N, 3, temperature=1.0, seed=list(range(N)))
    toks = np.array([r.token_ids for r in res])
    assert toks.shape == (N, 3)
    return toks[:, 0] * V * V + toks[:, 1] * V + toks[:, 2]


def two_sample_p(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square homogeneity test over joint-token cells; rare cells pooled."""
    ca = np.bincount(a, minlength=V**3)
    cb = np.bincount(b, minlength=V**3)
    tot = ca + cb
    rare = tot < 10
    table = np.stack([np.append(ca[~rare], ca[rare].sum()), np.append(cb[~rare], cb[rare].sum())])
    table = table[:, table.sum(0) > 0]
    return stats.chi2_contingency(table)[1]


@pytest.fixture(scope="module")
def ar_samples(pair):
    target, _ = pair
    return _samples(SpecDecoder(target, max_len=16, prompt_bucket=4))


def _sd(pair):
    target, draft = pair
    return SpecDecoder(target, draft, SpecConfig(method="draft", k=2), max_len=16,
                       prompt_bucket=4)


def test_sampled_sd_matches_target_distribution(pair, ar_samples):
    dec = _sd(pair)
    sd = _samples(dec)
    p = two_sample_p(ar_samples, sd)
    print(f"chi-square p (SD vs AR) = {p:.4f}")
    assert p >= 0.001


def _wrong_rule(key_B, drafts_BK, q_BKV, p_BTV):
    """Broken on purpose: after a rejection, resample from p instead of norm(max(0, p-q))."""
    orig = sampling.residual
    sampling.residual = lambda p, q: p
    try:
        return sampling.rejection_sample_chain(key_B, drafts_BK, q_BKV, p_BTV)
    finally:
        sampling.residual = orig


def test_broken_rule_is_detected(pair, ar_samples, monkeypatch):
    monkeypatch.setattr(loop_mod, "rejection_sample_chain", _wrong_rule)
    sd = _samples(_sd(pair))
    p = two_sample_p(ar_samples, sd)
    print(f"chi-square p (broken rule vs AR) = {p:.2e}")
    assert p < 0.001
