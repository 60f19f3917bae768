"""The benchmark harness runs and reports consistent fields (timings are not asserted)."""

import dataclasses

import numpy as np
import pytest

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


def test_traffic_bounds_count_unique_experts_and_draft_forwards():
    """bench.py spec --bound: an iteration's bytes are the target's for T verified tokens
    (T = 1 routes exactly top_k experts per layer) plus one draft forward per draft
    step; the bound scales acceptance by AR's bytes over the iteration's."""
    target = build(moe_cfg(), seed=0)
    draft = perturbed_copy(target, 0.3)
    rows = [{"config": c, "mean_acceptance_length": a, "tokens_per_s": 100.0}
            for c, a in (("none", 1.0), ("ngram:2", 1.5), ("chain:2", 2.0))]
    out = benchmarks.traffic_bounds(target, draft, [[1, 2, 3, 4, 5], [7, 8, 9]], rows,
                                    max_new=24, bandwidth_bytes=16 << 20)
    u = out["unique_experts"]
    assert u[1] == 2.0 and 2.0 < u[3] <= 8.0
    c = out["configs"]
    assert c["none"]["bound"] == pytest.approx(1.0)
    assert c["ngram:2"]["iteration_mb"] > out["ar_mb"]
    assert c["ngram:2"]["bound"] == pytest.approx(1.5 * out["ar_mb"] /
                                                  c["ngram:2"]["iteration_mb"])
    assert c["ngram:2"]["bound"] < 1.5
    assert (c["chain:2"]["iteration_mb"] - c["ngram:2"]["iteration_mb"] ==
            pytest.approx(2 * out["draft_mb"]["draft"]))
    assert out["ar_gb_per_s"] == pytest.approx(100.0 * out["ar_mb"] / 1e3)
    assert out["read_gb_per_s"] > 0
    assert benchmarks.spec_plan("tree:tree-15")[:2] == (16, 4)
    assert benchmarks.spec_plan("eagle-tree:tree-15")[2] == "eagle"


def test_time_interleaved_rotates_and_pairs_ratios():
    """Every decoder runs once to warm up, then batch by batch in rotating order; a
    speedup is the median of same-batch ratios."""
    import types

    calls = []

    def run(name, bt):
        calls.append((name, bt))
        return [types.SimpleNamespace(token_ids=[0] * len(bt), stats={})]

    runs = benchmarks.time_interleaved({"a": "a", "b": "b", "c": "c"}, ["x", "yy", "zzz"], run)
    assert calls[:3] == [("a", "x"), ("b", "x"), ("c", "x")]  # warm-up
    assert [n for n, _ in calls[3:]] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [b for _, b in calls[3:]] == ["x"] * 3 + ["yy"] * 3 + ["zzz"] * 3
    assert [len(r) for r in runs["a"].results] == [1, 1, 1] and runs["a"].tokens == [
        [0], [0, 0], [0, 0, 0]]
    a = benchmarks.Timed([1.0, 2.0, 4.0], [])
    b = benchmarks.Timed([2.0, 2.0, 1.0], [])
    assert a.speedup_over(b) == 1.0  # median of 0.5, 1, 4
    assert a.rate == 2.0


def test_decode_sweep_tiny_shape(tmp_path):
    """bench.py decode's harness on a tiny MoE (the dense model runs the same code minus
    the experts): every oracle-SD point gives the AR tokens,
    acceptance 1 accepts every draft, bytes count only the unique routed experts."""
    from moesd_jax import bench_decode as bd

    cfgs = bd.bench_configs(d_model=32, layers=2, experts=8, top_k=2, expert_dim=32, vocab=128)
    from moesd_jax.analysis.cost_model import preset

    rows = bd.decode_sweep(["moe"], [2], [0, 3], acceptance=1.0, n1=2, n2=6,
                           repeats=1, configs=cfgs, hw=preset("h100"))
    assert [(r["model"], r["k"]) for r in rows] == [("moe", 0), ("moe", 3)]
    assert all(r["tokens_equal"] for r in rows)
    assert rows[1]["mean_acceptance_length"] > 3.0  # acceptance 1: K+1 per step
    e_bytes, emb_bytes = 3 * 32 * 32 * 4, 128 * 32 * 4
    # a step reads everything but the embedding table and the experts nobody routed to
    unread = rows[0]["total_weight_bytes"] - rows[0]["active_weight_bytes_per_step"]
    assert (unread - emb_bytes) % e_bytes == 0 and unread - emb_bytes > 0
    assert 1 <= rows[1]["unique_experts_verify"] <= 8
    # the cost model's prediction for the same point (acceptance 1: sigma = K + 1)
    assert rows[0]["predicted_sd_speedup"] == 1.0
    assert rows[1]["predicted_verify_over_step"] >= 1.0
    assert rows[1]["predicted_sd_speedup"] == pytest.approx(
        4.0 / rows[1]["predicted_verify_over_step"])
    paths = bd.write_outputs(rows, tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_costmodel_sweep_tiny_shape():
    """bench.py costmodel's harness: measured vs predicted per (model, batch, T), with the
    unique experts the forward routed to (timings are not asserted)."""
    from moesd_jax import bench_decode as bd
    from moesd_jax.analysis.cost_model import preset

    cfgs = bd.bench_configs(d_model=32, layers=2, experts=8, top_k=2, expert_dim=32, vocab=128)
    rows, hw = bd.costmodel_sweep(preset("h100"), ["moe"], [2], [1, 3], context=4,
                                  repeats=1, configs=cfgs)
    assert hw == preset("h100")
    assert [(r["batch"], r["tokens"]) for r in rows] == [(2, 1), (2, 3)]
    # interleaved: a calibration before each pass, the predictions from their median
    fast, slow = (dataclasses.replace(preset("h100"), mem_bandwidth=bw) for bw in (1e13, 1e11))
    cals = iter([fast, slow, slow])
    rows3, hw3 = bd.costmodel_sweep(None, ["moe"], [2], [1], context=4, repeats=1,
                                    configs=cfgs, passes=3, calibrate=lambda: next(cals))
    assert hw3.mem_bandwidth == 1e11 and "median of 3" in hw3.source
    assert rows3[0]["predicted_ms"] > rows[0]["predicted_ms"]
    for r in rows:
        assert r["measured_ms"] > 0 and r["predicted_ms"] > 0
        assert 1 <= r["unique_experts"] <= min(8, 2 * r["tokens"] * 2)
        assert r["error"] == pytest.approx(r["predicted_ms"] / r["measured_ms"] - 1)


def test_budget_sweep_tiny_shape():
    """bench.py budget's harness on the tiny memory-bound shape with the oracle filling a
    tree: lossless gives the unbudgeted tokens with at most B (+ the root's k) experts per
    layer; every point carries the reported fields (timings are not asserted)."""
    from moesd_jax import bench_budget
    from moesd_jax.config import SpecConfig

    target, prompts, ref = bench_budget.bench_shape_workload(True, 2, 8, 4, depth=3)
    spec = SpecConfig(method="oracle", tree="tree-7", oracle_acceptance=0.8)
    rows = bench_budget.budget_sweep(target, None, spec, prompts, budgets=[2],
                                     policies=["lossless"], max_new=4, repeats=1, batch=2,
                                     oracle_reference=ref)
    assert [(r["policy"], r["b"]) for r in rows] == [("none", 8), ("lossless", 2)]
    none, lossless = rows
    assert lossless["equal_to_unbudgeted"] and lossless["agreement"] == 1.0
    assert 0 < lossless["unique_experts"] <= 2 + 2 * 2  # B + the roots' top-k, 2 rows
    assert lossless["unique_experts"] <= none["unique_experts"]
    assert none["expert_mb_per_verify"] == pytest.approx(
        none["unique_experts"] * 2 * 3 * 64 * 64 * 4 / 1e6)
    for r in rows:
        assert r["tokens_per_s"] > 0 and 1.0 <= r["acceptance_length"] <= 4.0
        assert 0.0 < r["mass_kept"] <= 1.0


def test_utility_sweep_tiny_shape(monkeypatch):
    """bench.py utility's harness on the tiny shape with the oracle: every config gives
    AR's tokens, auto reports its decisions and costs, and each batch decodes with its own
    seed, the same for every config (one seed for every call repeated the oracle's accept
    draws at the controller's test iterations). Timings are not asserted."""
    from flax import nnx

    from moesd_jax import bench_decode as bd
    from moesd_jax import bench_utility as bu
    from moesd_jax.models.transformer import Transformer
    from moesd_jax.spec.decoder import SpecDecoder

    cfg = bd.bench_configs(d_model=32, layers=2, experts=8, top_k=2, expert_dim=32,
                           vocab=128)["moe"]
    target = Transformer(cfg, nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(1, 128, (3, 6)).tolist()
    seen = []
    orig = SpecDecoder.generate

    def spy(self, prompts, max_new, **kw):
        seen.append((self.spec.method, self.spec.auto, kw.get("seed")))
        return orig(self, prompts, max_new, **kw)

    monkeypatch.setattr(SpecDecoder, "generate", spy)
    rows = bu.utility_sweep(target, None, "oracle", {"o": prompts},
                            configs=("none", "k:2", "auto"), max_new=12, batch=1,
                            oracle_acceptance=0.5)
    assert [r["config"] for r in rows] == ["none", "k:2", "auto"]
    assert all(r["equal_to_ar"] for r in rows)
    auto = rows[-1]
    assert len(auto["auto_costs"]) == 3 and auto["auto_costs"][0] == 1.0
    assert "vs_best_static" in auto and auto["speedup"] > 0
    for method, is_auto in (("none", False), ("oracle", False), ("oracle", True)):
        # (AR's calls without a seed make the oracle's reference, before the timing)
        seeds = {s for m, a, s in seen if (m, a) == (method, is_auto) and s is not None}
        assert seeds == {0, 1, 2}, (method, is_auto, seen)
    assert all(s is not None for m, _, s in seen if m == "oracle")
