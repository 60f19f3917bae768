"""``bench.py decode``: AR vs speculative decoding on a memory-bound MoE shape and the
dense model of equal active size, with an oracle drafter (the papers' system view).

Method (DESIGN.md "Performance method"): random float32 weights; for each (model,
batch) an AR run gives the reference continuation and the AR rate; each K > 0 runs the
oracle drafter (``SpecConfig(method="oracle")``: the target's own greedy token kept
with probability ``acceptance`` per position, at no cost) and must reproduce the AR
tokens. Rates are decode-only: ``B * (N2 - N1) / (t(N2) - t(N1))`` over two generate
lengths, medians of ``repeats``. Bytes per AR step count the weights a step must read
given the routing it actually took (unique experts per layer from the routing trace),
and are divided by the step time and compared with the read bandwidth measured in the
same run (:func:`read_bandwidth`).
"""

from __future__ import annotations

import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moesd_jax.analysis.cost_model import expected_unique_experts, read_bandwidth
from moesd_jax.config import ModelConfig, MoEConfig, SpecConfig
from moesd_jax.kv_cache import KVCache
from moesd_jax.models.transformer import Transformer, apply, param_bytes
from moesd_jax.runtime import cpu_decode_layout

BATCHES = (1, 2, 4, 8, 16, 32, 64)
KS = (0, 1, 2, 4, 8)


def bench_configs(d_model: int = 1024, layers: int = 8, experts: int = 32, top_k: int = 4,
                  expert_dim: int = 1024, vocab: int = 32000) -> dict[str, ModelConfig]:
    """The Mixtral-like MoE shape and the dense model with the same active parameters
    (its MLP is ``top_k * expert_dim`` wide)."""
    common = dict(vocab_size=vocab, d_model=d_model, num_layers=layers, num_heads=16,
                  num_kv_heads=8, max_seq_len=4096, param_dtype="float32",
                  compute_dtype="float32", eos_token_ids=())
    return {
        "moe": ModelConfig(mlp_dim=expert_dim, **common,
                           moe=MoEConfig(num_experts=experts, top_k=top_k,
                                         expert_dim=expert_dim, dispatch="gather")),
        "dense": ModelConfig(mlp_dim=top_k * expert_dim, **common),
    }


def bench_shape_pair(seed: int = 0):
    """(target, draft) for ``bench.py hf --bench-shape``: the MoE of :func:`bench_configs`
    (random weights, stacked experts: the HF export reads them so; the benchmark switches
    to the CPU decode layout after exporting) and a random dense 2-layer draft with the
    same vocabulary (d 256: about 8% of the target's per-token bytes)."""
    cfg = bench_configs()["moe"]
    dcfg = ModelConfig(vocab_size=cfg.vocab_size, d_model=256, num_layers=2, num_heads=4,
                       num_kv_heads=4, mlp_dim=1024, max_seq_len=cfg.max_seq_len,
                       param_dtype="float32", compute_dtype="float32", eos_token_ids=())
    return Transformer(cfg, nnx.Rngs(seed)), Transformer(dcfg, nnx.Rngs(seed + 1))


def _weight_bytes(model: Transformer, routing_BTLK: np.ndarray | None) -> tuple[int, int]:
    """(bytes one step reads given its routing, total parameter bytes).

    Every non-expert weight is read once per step except the embedding table (one row
    per token, negligible); each MoE layer reads its unique routed experts.
    """
    total = param_bytes(model)
    cfg = model.cfg
    emb = cfg.vocab_size * cfg.d_model * 4
    if cfg.moe is None:
        return total - emb, total
    e_bytes = 3 * cfg.d_model * cfg.moe.expert_dim * 4
    n_moe = sum(int(layer.is_moe) for layer in model.layers)
    experts_all = n_moe * cfg.moe.num_experts * e_bytes
    uniq = float(np.sum(unique_by_layer(routing_BTLK, cfg.moe.num_experts)))
    return total - emb - experts_all + uniq * e_bytes, total


def unique_by_layer(routing_BTLK: np.ndarray, num_experts: int) -> np.ndarray:
    """Distinct experts one forward's [B, T, L, K] routing loaded, per MoE layer (the
    forward as one step of ``analysis.routing.unique_per_step``; ids == E do not count)."""
    from moesd_jax.analysis.routing import unique_per_step

    b, t, layers, k = routing_BTLK.shape
    return unique_per_step(routing_BTLK.reshape(1, b * t, layers, k), num_experts)[0]


def rows_by_layer(routing_BTLK: np.ndarray, num_experts: int) -> np.ndarray:
    """Rows one forward's [B, T, L, K] routing sent to each expert, per MoE layer:
    int [L, E] (ids == E are dropped assignments and do not count)."""
    b, t, layers, k = routing_BTLK.shape
    ids = np.transpose(np.asarray(routing_BTLK), (2, 0, 1, 3)).reshape(layers, -1)
    return np.stack([np.bincount(row[row < num_experts], minlength=num_experts)
                     for row in ids.astype(np.int64)])


def unique_experts_per_layer(routing_BTLK: np.ndarray | None, num_experts: int) -> float:
    """Mean over MoE layers of the distinct experts one forward routed to (ids == E are
    dropped assignments and do not count)."""
    if routing_BTLK is None:
        return 0.0
    return float(np.mean(unique_by_layer(routing_BTLK, num_experts)))


def make_model(cfg: ModelConfig, seed: int = 0):
    """(graphdef, state) of a random-weight model in the layout CPU decoding uses."""
    model = Transformer(cfg, nnx.Rngs(seed))
    cpu_decode_layout(model)
    return nnx.split(model)


def forward_runner(graphdef, state, cfg: ModelConfig, batch: int, t: int, context: int,
                   capacity: int):
    """A compiled forward of T tokens per row after ``context`` cached ones, run once (the
    compile) -> (``time(repeats)``: the median seconds of that many forwards after an
    untimed one, its routing trace)."""
    cache = KVCache.init(cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.dh)
    cache = cache.replace(lengths=jnp.full((batch,), context, jnp.int32))
    toks = jax.random.randint(jax.random.PRNGKey(t), (batch, t), 0, cfg.vocab_size)
    pos = context + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (batch, t))
    fn = jax.jit(lambda s, c: apply(graphdef, s, toks, pos, c, return_routing=True),
                 donate_argnums=1)

    def once():
        c = jax.tree.map(jnp.copy, cache)
        jax.block_until_ready(c)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(state, c))
        return time.perf_counter() - t0, out

    out = once()[1]
    rt = None if out[2] is None else np.asarray(out[2])

    def time_it(repeats: int) -> float:
        once()  # untimed: the first forward after other work (a calibration) runs slow
        return statistics.median(once()[0] for _ in range(repeats))

    return time_it, rt


def forward_time(graphdef, state, cfg: ModelConfig, batch: int, t: int, context: int,
                 capacity: int, repeats: int = 5) -> tuple[float, np.ndarray | None]:
    """Median seconds of one forward of T tokens per row after ``context`` cached ones,
    and its routing trace."""
    time_it, rt = forward_runner(graphdef, state, cfg, batch, t, context, capacity)
    return time_it(repeats), rt


def _rate(dec, prompts, n1: int, n2: int, repeats: int, **kw) -> tuple[float, list]:
    """Decode-only tokens/s from two generate lengths (medians), and the n2 outputs."""
    b = len(prompts)
    dec.generate(prompts, n1, **kw)  # compile (one program serves both lengths)
    t1s, t2s, res = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        dec.generate(prompts, n1, **kw)
        t1s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = dec.generate(prompts, n2, **kw)
        t2s.append(time.perf_counter() - t0)
    dt = statistics.median(t2s) - statistics.median(t1s)
    return b * (n2 - n1) / max(dt, 1e-9), res


def decode_sweep(models=("moe", "dense"), batches=BATCHES, ks=KS, acceptance: float = 0.8,
                 prompt_len: int = 16, n1: int = 8, n2: int = 40, repeats: int = 3,
                 seed: int = 0, configs: dict[str, ModelConfig] | None = None,
                 progress=None, hw=None) -> list[dict]:
    """Runs the sweep; returns one dict per (model, batch, k) point (see bench.py decode).

    K = 0 rows are AR (sd fields equal AR); SD rows must reproduce the AR tokens
    (``tokens_equal``). ``verify_over_step`` is a T=K+1 forward's time over a T=1
    forward's at the same batch and context. With ``hw`` (a cost-model ``Hardware``,
    e.g. ``cpu-measured``) each row also carries the cost model's predictions for the
    same point (``predicted_*``: ``analysis/cost_model.py``, the one source of the
    formulas), the oracle drafter costing nothing.
    """
    from moesd_jax.analysis.cost_model import sd_speedup, step_cost
    from moesd_jax.spec.decoder import SpecDecoder

    configs = configs or bench_configs()
    bw = read_bandwidth()
    rng = np.random.default_rng(seed)
    rows = []
    for name in models:
        cfg = configs[name]
        model = Transformer(cfg, nnx.Rngs(seed))
        cpu_decode_layout(model)  # the layout every CLI decodes with
        graphdef, state = nnx.split(model)
        for b in batches:
            prompts = rng.integers(1, cfg.vocab_size, (b, prompt_len)).tolist()
            ar_dec = SpecDecoder(model, spec=SpecConfig(method="none"))
            ref = ar_dec.generate(prompts, n2 + max(ks) + 1)
            reference = [p + r.token_ids for p, r in zip(prompts, ref)]
            ar_rate, ar_out = _rate(ar_dec, prompts, n1, n2, repeats)
            cap = ar_dec.loop_config([prompt_len] * b, [n2 + max(ks) + 1]).max_len
            ctx = prompt_len + (n1 + n2) // 2
            t_step, routing = forward_time(graphdef, state, cfg, b, 1, ctx, cap)
            step_bytes, total_bytes = _weight_bytes(model, routing)
            ar_gbs = step_bytes * ar_rate / b / 1e9  # bytes per step x steps per second
            n_exp = cfg.moe.num_experts if cfg.moe is not None else 0
            for k in ks:
                row = {"model": name, "batch": b, "k": k, "ar_tok_per_s": ar_rate,
                       "active_weight_bytes_per_step": step_bytes,
                       "total_weight_bytes": total_bytes,
                       "active_weight_gb_per_s": ar_gbs,
                       "read_bandwidth_gb_per_s": bw["peak"] / 1e9,
                       "numpy_read_gb_per_s": bw["numpy_sum"] / 1e9,
                       "bandwidth_fraction": ar_gbs * 1e9 / bw["peak"],
                       "oracle_acceptance": acceptance, "step_ms": t_step * 1e3,
                       "unique_experts_step": unique_experts_per_layer(routing, n_exp)}
                if k == 0:
                    row |= {"sd_tok_per_s": ar_rate, "sd_speedup": 1.0,
                            "verify_over_step": 1.0, "mean_acceptance_length": 1.0,
                            "tokens_equal": True}
                else:
                    sd = SpecDecoder(model, spec=SpecConfig(method="oracle", k=k,
                                                            oracle_acceptance=acceptance))
                    sd_rate, sd_out = _rate(sd, prompts, n1, n2, repeats,
                                            oracle_reference=reference)
                    t_ver, vrt = forward_time(graphdef, state, cfg, b, k + 1, ctx, cap)
                    acc = [r.stats["mean_acceptance_length"] for r in sd_out]
                    row |= {"sd_tok_per_s": sd_rate, "sd_speedup": sd_rate / ar_rate,
                            "verify_over_step": t_ver / t_step,
                            "unique_experts_verify": unique_experts_per_layer(vrt, n_exp),
                            "unique_experts_verify_independent": (
                                expected_unique_experts(n_exp, cfg.moe.top_k, b * (k + 1))
                                if n_exp else 0.0),
                            "mean_acceptance_length": float(np.mean(acc)),
                            "tokens_equal": [r.token_ids for r in sd_out]
                            == [r.token_ids for r in ar_out]}
                if hw is not None:
                    pred = step_cost(cfg, hw, b, 1, context=ctx)
                    row |= {"predicted_step_ms": pred.time_s * 1e3}
                    if k:
                        sp = sd_speedup(cfg, hw, b, k, acceptance, None, ctx)
                        row |= {"predicted_verify_over_step": 1.0 / sp["target_efficiency"],
                                "predicted_sd_speedup": sp["speedup"]}
                    else:
                        row |= {"predicted_verify_over_step": 1.0,
                                "predicted_sd_speedup": 1.0}
                row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
                rows.append(row)
                if progress is not None:
                    progress(row)
        del model, state, graphdef
    return rows


def write_outputs(rows: list[dict], out_dir: str = "docs", stem: str = "decode_sweep") -> list:
    """CSV of every row and a PNG of SD speedup vs batch per K (MoE solid, dense dashed)."""
    import csv
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{stem}.csv"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, k in enumerate(sorted({r["k"] for r in rows if r["k"] > 0})):
        for name, style in (("moe", "-o"), ("dense", "--s")):
            pts = sorted((r["batch"], r["sd_speedup"]) for r in rows
                         if r["k"] == k and r["model"] == name)
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{name} K={k}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("SD speedup over AR (oracle drafter)")
    acc = rows[0]["oracle_acceptance"] if rows else 0
    ax.set_title(f"AR vs SD, oracle acceptance {acc}, this CPU")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png_path = out / f"{stem}.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return [csv_path, png_path]



def costmodel_sweep(hw, models=("moe", "dense"), batches=(1, 2, 4, 8, 16, 32, 64),
                    tokens=(1, 2, 4, 8), context: int = 32, repeats: int = 3,
                    configs: dict[str, ModelConfig] | None = None, progress=None,
                    passes: int = 1, calibrate=None) -> tuple[list[dict], object]:
    """The cost model's calibration check: for each (model, batch, T) the measured time of
    one jitted target forward of T tokens per row after ``context`` cached ones, next to
    ``analysis.cost_model.step_cost`` (independence formula for the unique experts, and
    with the rows per expert the forward actually routed: its unique experts and exact
    row-chunk count). Returns (rows, the hardware the predictions used).

    Every forward is compiled first; then ``passes`` passes each time every point
    (median of ``repeats`` forwards), after running ``calibrate()`` (a ``Hardware``, e.g.
    one pass of ``calibrate_cpu``) when given. A point's time is the median of its
    passes and the predictions use the passes' calibrations merged
    (``cost_model.median_hardware``; without ``calibrate``, ``hw``): calibration and
    sweep interleaved, so that a slow or fast spell of the machine touches both alike
    instead of the calibration alone, minutes before the sweep."""
    from moesd_jax.analysis.cost_model import median_hardware, step_cost

    configs = configs or bench_configs()
    points = []
    for name in models:
        cfg = configs[name]
        graphdef, state = make_model(cfg)
        cap = -(-(context + max(tokens)) // 128) * 128
        for b in batches:
            for t in tokens:
                time_it, rt = forward_runner(graphdef, state, cfg, b, t, context, cap)
                points.append((name, cfg, b, t, time_it, rt))
    times: dict[int, list[float]] = {i: [] for i in range(len(points))}
    hws = []
    for _ in range(passes):
        if calibrate is not None:
            hws.append(calibrate())
        for i, pt in enumerate(points):
            times[i].append(pt[4](repeats))
    hw = median_hardware(hws) if hws else hw
    rows = []
    for i, (name, cfg, b, t, _, rt) in enumerate(points):
        meas = statistics.median(times[i])
        n_exp = cfg.moe.num_experts if cfg.moe else 0
        pred = step_cost(cfg, hw, b, t, context=context)
        row = {"model": name, "batch": b, "tokens": t, "measured_ms": meas * 1e3,
               "measured_spread": (max(times[i]) - min(times[i])) / meas,
               "predicted_ms": pred.time_s * 1e3,
               "error": pred.time_s / meas - 1.0,
               "predicted_bytes": pred.bytes, "predicted_flops": pred.flops,
               "expert_fraction": pred.expert_fraction}
        if n_exp:
            rows_le = rows_by_layer(rt, n_exp)
            u_layers = (rows_le > 0).sum(axis=1).tolist()
            traced = step_cost(cfg, hw, b, t, context=context, expert_rows=rows_le)
            row |= {"unique_experts": float(np.mean(u_layers)),
                    "unique_experts_independent": pred.unique_experts,
                    "predicted_traced_ms": traced.time_s * 1e3,
                    "error_traced": traced.time_s / meas - 1.0}
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows, hw
