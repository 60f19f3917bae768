"""Sampled SD has exactly the target's distribution (chi-square, two-sample).

A batch of N rows with different seeds generates 3 tokens from the same prompt, with AR
and with SD (K = 2). The joint distribution of the 3 tokens must agree (p >= 0.001);
a deliberately broken acceptance rule must make the same test fail (p < 0.001).
"""

import pytest

from moesd_jax.config import SpecConfig
from moesd_jax.spec import sampling
from moesd_jax.spec.decoder import SpecDecoder
from tests.spec.chisq import make_pair, samples, two_sample_p


@pytest.fixture(scope="module")
def pair():
    return make_pair()


@pytest.fixture(scope="module")
def ar_samples(pair):
    target, _ = pair
    return samples(SpecDecoder(target, max_len=16, prompt_bucket=4))


def _sd(pair):
    target, draft = pair
    return SpecDecoder(target, draft, SpecConfig(method="draft", k=2), max_len=16,
                       prompt_bucket=4)


def test_sampled_sd_matches_target_distribution(pair, ar_samples):
    dec = _sd(pair)
    sd = samples(dec)
    p = two_sample_p(ar_samples, sd)
    print(f"chi-square p (SD vs AR) = {p:.4f}")
    assert p >= 0.001


def test_broken_rule_is_detected(pair, ar_samples, monkeypatch):
    # broken on purpose: after a rejection, resample from p instead of norm(max(0, p-q))
    monkeypatch.setattr(sampling, "residual", lambda p, q: p)
    sd = samples(_sd(pair))
    p = two_sample_p(ar_samples, sd)
    print(f"chi-square p (broken rule vs AR) = {p:.2e}")
    assert p < 0.001


@pytest.mark.slow  # the EAGLE head's greedy == AR tests run by default (test_eagle.py)
@pytest.mark.parametrize("spec_kw", [dict(k=2), dict(tree="tree-7")])
def test_sampled_eagle_matches_target_distribution(pair, ar_samples, spec_kw):
    """The EAGLE-3 head drafts (chain and tree) through the same rejection sampling: the
    joint distribution of sampled tokens is the target's. An untrained head with a
    sharpened vocabulary projection, so its drafts are confident and often wrong."""
    from flax import nnx

    from moesd_jax.spec.eagle import EagleConfig, EagleHead

    target, _ = pair
    head = EagleHead(EagleConfig.for_target(target.cfg), nnx.Rngs(7))
    head.lm_head_DV[...] = head.lm_head_DV[...] * 6.0
    dec = SpecDecoder(target, head, SpecConfig(method="eagle", **spec_kw), max_len=16,
                      prompt_bucket=4)
    got = samples(dec)
    p = two_sample_p(ar_samples, got)
    print(f"chi-square p (EAGLE {spec_kw} vs AR) = {p:.4f}")
    assert p >= 0.001
