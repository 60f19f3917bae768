"""``bench_hf.compare_hf`` runs end to end on the bundled pair and matches HF token for token.

Speeds are not asserted (speed claims live in ``scripts/bench.py``). The default run
compares at batch 1; the slow test adds batch 2, where the shorter second prompt
exercises HF's left padding against our ragged rows.
"""

import numpy as np
import pytest

from moesd_jax import bench_hf

pytest.importorskip("torch")

NEW = 8


def _compare(batches):
    from moesd_jax.data import heldout_prompts
    from moesd_jax.runtime import load_models

    lm = load_models(spec="draft")
    tok = lm.tokenizer
    prompts = [tok.encode(t) for t in heldout_prompts(tok, n=2, prompt_tokens=64)]
    prompts[1] = prompts[1][:50]
    return bench_hf.compare_hf(lm.target, lm.draft, prompts, NEW, batches=batches, k=4,
                               torch_threads=1)


@pytest.fixture(scope="module")
def result():
    return _compare((1,))


def test_tokens_equal_hf(result):
    assert result["mismatches"] == []
    assert result["tokens_equal"] is True


@pytest.mark.slow
def test_tokens_equal_hf_left_padded_batch():
    res = _compare((1, 2))
    assert res["mismatches"] == [] and res["tokens_equal_batch2"] is True
    assert res["rows_equal_fraction_batch2"] == 1.0
    assert {"batch2_ar_speedup_vs_hf", "batch2_sd_speedup_vs_hf_greedy", "hf_greedy_tok_s_batch2",
            "ours_ar_tok_s_batch2", "ours_sd_tok_s_batch2"} <= set(res)
    assert "hf_assisted_tok_s_batch2" not in res  # batch-1 only in transformers


def test_result_keys(result):
    keys = {"ar_speedup_vs_hf", "sd_speedup_vs_hf", "tokens_equal",
            "ours_sd_mean_acceptance_length",
            "hf_assisted_mean_acceptance_length", "torch_threads", "prompts",
            "max_new_tokens", "hf_greedy_tok_s_batch1", "hf_assisted_tok_s_batch1",
            "ours_ar_tok_s_batch1", "ours_sd_tok_s_batch1"}
    assert keys <= set(result)
    assert (result["prompts"], result["max_new_tokens"], result["torch_threads"]) == (2, NEW, 1)
    assert [r["batch"] for r in result["rows"]] == [1]
    assert 1.0 <= result["ours_sd_mean_acceptance_length"] <= 5.0
    assert 1.0 <= result["hf_assisted_mean_acceptance_length"] <= 5.0
    assert "tokens equal" in bench_hf.format_table(result)


def test_left_pad():
    ids, mask = bench_hf.left_pad([[5, 6, 7], [8]])
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])


@pytest.mark.parametrize("kw, match", [(dict(batches=(2,)), "including 1"),
                                       (dict(batches=(1, 4)), "at least"),
                                       (dict(max_new_tokens=0), "max_new_tokens"),
                                       (dict(k=0), "k=0")])
def test_bad_arguments_raise(kw, match):
    args = dict(target=None, draft=None, prompts=[[1, 2], [3]], max_new_tokens=4)
    with pytest.raises(ValueError, match=match):
        bench_hf.compare_hf(**{**args, **kw})
