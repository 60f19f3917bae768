"""The benchmark harness runs and reports consistent fields (timings are not asserted)."""

from moesd_jax import benchmarks
from tests.helpers import build, moe_cfg, perturbed_copy


def test_moe_layer_rows():
    rows = benchmarks.moe_layer(num_experts=8, d=16, f=16, tokens=4, top_k=2,
                                actives=[1, 2, 8], repeats=2)
    assert [r["active"] for r in rows] == [1, 2, 8]
    assert all(r["weight_bytes"] == r["active"] * 3 * 16 * 16 * 4 for r in rows)


def test_spec_sweep_checks_equality_with_ar():
    target = build(moe_cfg(), seed=0)
    draft = perturbed_copy(target, 0.3)
    prompts = [[1, 2, 3, 4], [5, 6, 7], [9, 9, 9, 9, 9]]
    rows = benchmarks.spec_sweep(target, draft, prompts, ["chain:2"], max_new=8, batch=3,
                                 max_len=64)
    assert [r["config"] for r in rows] == ["none", "chain:2"]
    assert all(r["equal_to_ar"] for r in rows)
    assert rows[0]["mean_acceptance_length"] == 1.0
    assert 1.0 <= rows[1]["mean_acceptance_length"] <= 3.0
