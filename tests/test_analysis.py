"""Cost model formulas (hand-computed values, Monte-Carlo), the predicted curve's shape,
routing-trace analysis, and traces recorded by the decode loop."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from moesd_jax.analysis import cost_model as cm
from moesd_jax.analysis import routing
from moesd_jax.config import ModelConfig, load_config

NO_OVERHEAD = cm.Hardware("ideal", peak_flops=1e15, mem_bandwidth=1e12)


def test_unique_experts_hand_values():
    # MoESD's examples (../shared/papers/NOTES.md)
    assert cm.expected_unique_experts(64, 8, 4) == pytest.approx(26.48, abs=0.01)
    assert cm.expected_unique_experts(64, 8, 8) == pytest.approx(42.01, abs=0.01)
    assert cm.expected_unique_experts(8, 2, 4) == pytest.approx(5.47, abs=0.01)
    assert cm.expected_unique_experts(128, 8, 8) == pytest.approx(51.6, abs=0.05)
    assert cm.expected_unique_experts(32, 4, 1) == 4.0
    assert cm.expected_unique_experts(32, 4, 0) == 0.0


def test_unique_experts_and_chunks_match_monte_carlo():
    rng = np.random.default_rng(0)
    n, k = 16, 2
    for tokens, chunk in [(1, 1), (4, 1), (10, 2), (40, 8)]:
        uniq, chunks = [], []
        for _ in range(4000):  # each token: k distinct experts uniformly at random
            ids = np.stack([rng.choice(n, k, replace=False) for _ in range(tokens)])
            counts = np.bincount(ids.ravel(), minlength=n)
            uniq.append((counts > 0).sum())
            chunks.append(np.ceil(counts / chunk).sum())
        assert cm.expected_unique_experts(n, k, tokens) == pytest.approx(np.mean(uniq), rel=0.02)
        assert cm.expected_chunks(n, k, tokens, chunk) == pytest.approx(np.mean(chunks),
                                                                        rel=0.02)


def test_chunks_given_unique_experts_hand_and_monte_carlo():
    """Chunks of a layer whose routed rows went to U experts (a trace's count): by hand
    at the ends, Monte-Carlo (each expert one row, the rest spread uniformly) between."""
    assert cm.chunks_given_unique(5, 5, 8) == 5.0  # one row each
    assert cm.chunks_given_unique(1, 10, 8) == 2.0  # ceil(10 / 8)
    assert cm.chunks_given_unique(0, 0, 8) == 0.0
    rng = np.random.default_rng(1)
    for u, routed, chunk in [(4, 32, 8), (20, 64, 4), (31, 512, 8)]:
        sims = [np.ceil((1 + np.bincount(rng.integers(0, u, routed - u), minlength=u))
                        / chunk).sum() for _ in range(3000)]
        got = cm.chunks_given_unique(u, routed, chunk)
        assert got == pytest.approx(np.mean(sims), rel=0.01)
        assert got < u + (routed - u) / chunk  # the old count's partial chunk per expert


def test_expected_tokens_and_speedup_formula():
    assert cm.expected_tokens(0.0, 4) == 1.0
    assert cm.expected_tokens(1.0, 4) == 5.0
    assert cm.expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert cm.expected_tokens([0.9, 0.5, 0.1], 3) == pytest.approx(1 + 0.9 + 0.45 + 0.045)
    with pytest.raises(ValueError, match="acceptance"):
        cm.expected_tokens(1.5, 2)
    cfg = load_config(ModelConfig, "mixtral-8x7b")
    r = cm.sd_speedup(cfg, NO_OVERHEAD, 4, 3, 0.8, draft=0.1)
    t1 = cm.step_time(cfg, NO_OVERHEAD, 4, 1)
    tv = cm.step_time(cfg, NO_OVERHEAD, 4, 4)
    assert r["speedup"] == pytest.approx(cm.expected_tokens(0.8, 3) * t1 / (3 * 0.1 * t1 + tv))
    assert r["target_efficiency"] == pytest.approx(t1 / tv)


def test_step_cost_bytes_by_hand():
    """A 1-layer MoE at batch 1, T=1 in float32: every non-expert weight once, k experts."""
    from moesd_jax.config import MoEConfig

    cfg = ModelConfig(vocab_size=100, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1,
                      mlp_dim=16, moe=MoEConfig(num_experts=4, top_k=2, expert_dim=16))
    c = cm.step_cost(cfg, NO_OVERHEAD, 1, 1, context=10)
    dh = 4
    attn = 8 * 2 * dh * 2 + 8 * 1 * dh * 2
    kv = 11 * 2 * 1 * dh
    assert c.parts["attention"].bytes == attn * 4
    assert c.parts["attn_core"].bytes == kv * 4
    assert c.parts["router"].bytes == 8 * 4 * 4
    assert c.parts["experts"].bytes == 2 * 3 * 8 * 16 * 4  # k = 2 unique experts
    assert c.parts["lm_head"].bytes == 8 * 100 * 4
    assert c.unique_experts == 2.0
    # measured unique experts override the formula
    assert cm.step_cost(cfg, NO_OVERHEAD, 1, 3, unique_experts=[3]).unique_experts == 3.0
    # a trace's rows per expert: unique experts, and on a row-chunk engine the exact
    # chunks sum ceil(rows / chunk) (chunk = row_chunk(3 rows, k 2, E 4) = 2 here)
    from moesd_jax.models.moe import row_chunk

    chunky = dataclasses.replace(NO_OVERHEAD, expert_row_chunks=True)
    c = row_chunk(3, 2, 4)
    rows = [[3, 2, 1, 0]]
    tr = cm.step_cost(cfg, chunky, 1, 3, expert_rows=rows)
    assert tr.unique_experts == 3.0
    want = sum(math.ceil(r / c) for r in rows[0])
    assert tr.parts["experts"].bytes == want * 3 * 8 * 16 * 4
    with pytest.raises(ValueError, match="expert_rows"):
        cm.step_cost(cfg, chunky, 1, 3, expert_rows=[[1, 2]] * 2)
    with pytest.raises(ValueError, match="batch"):
        cm.step_cost(cfg, NO_OVERHEAD, 0, 1)


def test_presets_load_and_cite():
    for name in cm.preset_names():
        if name == "cpu-measured":
            continue
        hw = cm.preset(name)
        assert hw.peak_flops > 1e13 and hw.mem_bandwidth > 1e11 and hw.source.startswith("http")
    assert cm.preset("H100").mem_bandwidth == 3.35e12
    with pytest.raises(ValueError, match="h1000"):
        cm.preset("h1000")


@pytest.mark.parametrize("name", ["olmoe-1b-7b", "mixtral-8x7b"])
def test_h100_curve_moe_non_monotonic_dense_decreasing(name):
    """The MoESD/Cohere shape: MoE SD speedup rises with batch then falls; the dense model
    of equal active size only falls."""
    cfg = load_config(ModelConfig, name)
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    rows = cm.speedup_curve(cfg, cm.preset("h100"), batches, [3])
    moe = [r["moe_speedup"] for r in rows]
    dense = [r["dense_speedup"] for r in rows]
    peak = int(np.argmax(moe))
    assert 0 < peak < len(moe) - 1
    assert moe[peak] > 1.5 * moe[0] and moe[peak] > 1.1 * moe[-1]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(dense, dense[1:]))
    assert dense[0] > 1.1 * dense[-1]


def test_bench_moe_config_is_the_decode_benchmarks_shape():
    """``configs/models/bench-moe.yaml`` (the cost model's name for it) is the shape that
    ``bench.py decode`` and ``bench.py hf --bench-shape`` build; at batch 1 a K = 4 verify
    of it routes ~15.6 experts per layer against 4, so its SD stays far from a dense
    model's even with a free drafter, and the gap closes with batch (MoESD)."""
    from moesd_jax.bench_decode import bench_configs

    cfg = load_config(ModelConfig, "bench-moe")
    assert dataclasses.asdict(cfg) == dataclasses.asdict(bench_configs()["moe"])
    b1, b8 = cm.speedup_curve(cfg, cm.preset("h100"), [1, 8], [4], 0.8, None, context=64)
    assert b1["moe_speedup"] < 0.5 * b1["dense_speedup"]
    assert b8["moe_speedup"] > 1.5 * b1["moe_speedup"]


def test_predict_speedup_cli_json(tmp_path, capsys):
    from moesd_jax.cli.predict_speedup import main

    assert main(["--model", "olmoe-1b-7b", "--hardware", "tpu-v5e", "--batch", "1", "64",
                 "--k", "2", "3", "--out-dir", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip())
    assert [(r["batch"], r["k"]) for r in rows] == [(1, 2), (1, 3), (64, 2), (64, 3)]
    assert {"moe_speedup", "dense_speedup", "sigma"} <= set(rows[0])
    assert (tmp_path / "predict_olmoe-1b-7b_tpu-v5e.png").stat().st_size > 0
    assert main(["--model", "olmoe-1b-7b", "--hardware", "tpu-v9"]) == 2
    assert "tpu-v9" in capsys.readouterr().err


# -- routing ----------------------------------------------------------------------------------
def test_unique_and_overlap_by_hand():
    e = 8
    # 2 steps, T=2 tokens, 1 layer, k=2; id 8 = no expert
    tr = np.array([[[[0, 1]], [[1, 2]]], [[[2, 3]], [[8, 8]]]])
    assert routing.unique_per_step(tr, e).tolist() == [[3.0], [2.0]]
    # step 1 = {2, 3}; step 0 had {0, 1, 2}: half of step 1's experts were loaded before
    assert routing.step_overlap(tr, e) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="steps, tokens, layers, top_k"):
        routing.unique_per_step(tr[0], e)


def test_correlated_traces_show_reduction_independent_do_not():
    rng = np.random.default_rng(1)
    n, k, layers = 16, 2, 2

    def request(sticky: bool, steps=40):
        rows, cur = [], rng.choice(n, k, replace=False)
        for _ in range(steps * 4):
            if not sticky or rng.random() < 0.3:
                cur = rng.choice(n, k, replace=False)
            rows.append(np.stack([cur] * layers))
        return np.array(rows).reshape(steps, 4, layers, k)

    sticky = routing.analyze([request(True) for _ in range(6)], n, k)
    indep = routing.analyze([request(False) for _ in range(6)], n, k)
    assert sticky.reduction > 0.3 and sticky.reduction_ci[1] > 0.2
    assert abs(indep.reduction) < 0.05
    assert indep.baseline == pytest.approx(cm.expected_unique_experts(n, k, 4), rel=0.05)
    assert sticky.overlap > indep.overlap


def test_save_load_roundtrip(tmp_path):
    tr = [np.zeros((3, 5, 2, 2), np.int16), np.ones((1, 5, 2, 2), np.int16)]
    routing.save_traces(tmp_path / "t.npz", tr, 8, 2)
    back, n, k = routing.load_traces(tmp_path / "t.npz")
    assert (n, k) == (8, 2) and [b.tolist() for b in back] == [t.tolist() for t in tr]


def test_loop_records_the_routing_it_ran():
    """The AR trace equals the routing of a teacher-forced forward over the same tokens;
    an SD trace has one [K+1, L, k] entry per verify step (the loop's iteration count)."""
    import jax.numpy as jnp

    from moesd_jax.config import SpecConfig
    from moesd_jax.kv_cache import KVCache
    from moesd_jax.models.transformer import apply
    from moesd_jax.spec.decoder import SpecDecoder
    from tests.helpers import build, moe_cfg, perturbed_copy

    cfg = moe_cfg()
    target = build(cfg)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    ar = SpecDecoder(target, spec=SpecConfig(method="none"), max_len=64)
    traces, res = routing.record_traces(ar, prompts, 6)
    outs = [r.token_ids for r in res]
    from flax import nnx

    g, s = nnx.split(target)
    for p, out, tr in zip(prompts, outs, traces):
        assert tr.shape == (len(out) - 1, 1, 2, 2)  # the last token is never run
        full = jnp.asarray([p + out])
        cache = KVCache.init(cfg.num_layers, 1, 64, cfg.num_kv_heads, cfg.dh)
        pos = jnp.arange(full.shape[1])[None]
        ref = np.asarray(apply(g, s, full, pos, cache, return_routing=True)[2])[0]
        np.testing.assert_array_equal(np.sort(tr[:, 0], -1),
                                      np.sort(ref[len(p): len(p) + len(tr)], -1))
    sd = SpecDecoder(target, perturbed_copy(target, 0.3), SpecConfig(method="draft", k=3),
                     max_len=64)
    sd_traces, sd_res = routing.record_traces(sd, prompts, 6)
    assert [r.token_ids for r in sd_res] == outs  # greedy SD == AR with the trace recorded
    for tr, r in zip(sd_traces, sd_res):  # one [K+1, L, k] entry per verify step
        assert tr.shape == (r.stats["iterations"], 4, 2, 2)
        assert (tr < cfg.moe.num_experts).all()  # every recorded step routed all tokens


def test_analyze_routing_cli_on_saved_traces(tmp_path, capsys):
    from moesd_jax.cli.analyze_routing import main

    rng = np.random.default_rng(0)
    tr = [rng.integers(0, 8, (20, 1, 2, 2)).astype(np.int16) for _ in range(4)]
    routing.save_traces(tmp_path / "t.npz", tr, 8, 2)
    assert main(["--traces", str(tmp_path / "t.npz"), "--out-dir", str(tmp_path),
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [r["tokens"] for r in rep["by_window"]] == list(range(1, 9))
    assert rep["sd_steps"]["steps"] == 80
    assert (tmp_path / "routing_report.png").exists()
    assert main(["--traces", str(tmp_path / "missing.npz")]) == 2
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    assert main(["--traces", str(tmp_path / "other.npz")]) == 2
    assert "not a routing-trace file" in capsys.readouterr().err


def test_amdahl_split_sums():
    cfg = load_config(ModelConfig, "olmoe-1b-7b")
    a = routing.amdahl(cfg, cm.preset("h100"), 1, 4)
    assert a["step_ms"] == pytest.approx(sum(a["parts_ms"].values()))
    assert 0 < a["expert_fraction"] < 1
    assert a["max_speedup_from_experts"] == pytest.approx(1 / (1 - a["expert_fraction"]))
    assert math.isclose(a["expert_ms"] + a["non_expert_ms"], a["step_ms"])


def test_calibration_table_median_of_passes_and_monotone_in_rows():
    """A calibration entry is the median of its passes; within one weight size time never
    falls as rows grow (a one-off slow entry is bounded by the next larger one)."""
    times = {(4, 1): [1.0, 9.0, 1.2], (4, 2): [1.1, 1.3, 1.2], (4, 4): [5.0, 0.9, 1.0],
             (8, 1): [2.0, 2.0, 2.0], (8, 2): [3.0, 3.0, 3.0]}
    tab = cm._table(times)
    assert tab == [(4, 1, 1.0), (4, 2, 1.0), (4, 4, 1.0), (8, 1, 2.0), (8, 2, 3.0)]


def test_median_hardware_merges_calibrations():
    """Calibrations from interleaved passes (``bench.py costmodel``) merge entry by entry:
    scalars and table entries the median, tables still monotone in rows."""
    base = dict(peak_flops=1e9, mem_bandwidth=1e9, cache_bytes=32)
    hws = [cm.Hardware("cpu-measured", **{**base, "mem_bandwidth": bw}, step_overhead_s=oh,
                       dots_cold=((4, 1, t1), (4, 2, t2)), chunks_hot=((8, 1, t1),))
           for bw, oh, t1, t2 in ((1e9, 1.0, 1.0, 2.0), (3e9, 5.0, 3.0, 2.5),
                                  (2e9, 2.0, 9.0, 4.0))]
    m = cm.median_hardware(hws)
    assert (m.mem_bandwidth, m.step_overhead_s, m.cache_bytes) == (2e9, 2.0, 32)
    assert m.dots_cold == ((4, 1, 2.5), (4, 2, 2.5))  # 3.0 bounded by the 2-row median
    assert m.chunks_hot == ((8, 1, 3.0),) and m.dots_hot == ()
    assert cm.median_hardware(hws[:1]) == hws[0]
    with pytest.raises(ValueError, match="at least one"):
        cm.median_hardware([])


def test_measured_attention_core_fit_and_use():
    """The attention core's calibration fits measured ``cached_attention`` calls; a preset
    with the fit prices ``attn_core`` as
    ``layers * B*G*blocks * (unit + elem*R*T*C)``, a roofline preset by bytes and FLOPs."""
    unit, elem = cm.measure_attention(batches=(1, 8), tokens=(1, 4), kv_heads=2, rep=2,
                                      head_dim=16, layers=2, repeats=1, passes=1)
    assert unit > 0 and elem >= 0
    cfg = load_config(ModelConfig, "olmoe-1b-7b")
    hw = dataclasses.replace(NO_OVERHEAD, attn_unit_s=unit, attn_elem_s=elem)
    g, r, c = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.dh
    for b, t in ((1, 1), (8, 4)):
        got = cm.step_cost(cfg, hw, b, t, context=32).parts["attn_core"].time_s
        assert got == pytest.approx(cfg.num_layers * b * g * 1 * (unit + elem * r * t * c))
    assert (cm.step_cost(cfg, hw, 8, 1, context=32).parts["attn_core"].time_s
            > 4 * cm.step_cost(cfg, hw, 1, 1, context=32).parts["attn_core"].time_s)
    roof = cm.step_cost(cfg, NO_OVERHEAD, 8, 1, context=32).parts["attn_core"]
    assert roof.time_s == pytest.approx(max(roof.bytes / 1e12, roof.flops / 1e15))
