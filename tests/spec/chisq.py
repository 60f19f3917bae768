"""Shared pieces of the losslessness tests: a tiny-vocab pair and a chi-square test.

N rows with different seeds generate 3 tokens from one prompt; the joint distribution of
the 3 tokens from SD must match AR's (two-sample chi-square homogeneity test).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from tests.helpers import build, dense_cfg, moe_cfg

N = 20_000
V = 8
PROMPT = [1, 2, 3]


def _sharpen(model, factor):
    # random init gives near-uniform next-token distributions; sharpen them so a wrong
    # acceptance rule is detectable
    model.lm_head_DV[...] = model.lm_head_DV[...] * factor
    return model


def make_pair():
    target = _sharpen(build(moe_cfg(vocab=V, layers=1, d=16, max_len=16), seed=0), 6.0)
    draft = _sharpen(build(dense_cfg(vocab=V, d=16, max_len=16), seed=5), 6.0)
    return target, draft


def samples(dec) -> np.ndarray:
    """Joint 3-token outcomes (as one int in [0, V^3)) of N seeded rows."""
    res = dec.generate([PROMPT] * N, 3, temperature=1.0, seed=list(range(N)))
    toks = np.array([r.token_ids for r in res])
    assert toks.shape == (N, 3)
    return toks[:, 0] * V * V + toks[:, 1] * V + toks[:, 2]


def two_sample_p(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square homogeneity p-value over joint-token cells; rare cells pooled."""
    ca = np.bincount(a, minlength=V**3)
    cb = np.bincount(b, minlength=V**3)
    rare = (ca + cb) < 10
    table = np.stack([np.append(ca[~rare], ca[rare].sum()), np.append(cb[~rare], cb[rare].sum())])
    table = table[:, table.sum(0) > 0]
    return stats.chi2_contingency(table)[1]
