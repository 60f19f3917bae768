#!/usr/bin/env python
"""Benchmarks. Speed claims live here, never in unit tests.

  python scripts/bench.py moe-layer [--experts 64 --d 1024 --f 1024 --tokens 16 --top-k 4]
      step time of one MoE layer vs active experts, bytes moved, and this machine's
      memcpy bandwidth measured in the same run.
  python scripts/bench.py spec [--configs none chain:4 tree:tree-15 ngram:4 --prompts 50]
      greedy AR vs SD on held-out code prompts with the bundled pair (or --model/--draft):
      mean acceptance length, tokens/s, speedup (median of per-batch ratios, configs
      interleaved batch by batch in one run).
  python scripts/bench.py batch [--prompts 50 --batch-size 10 --k 4 --max-new-tokens 64]
      the batch job (moesd-batch-decode's loop: static batches, one compiled program,
      JSONL written and fsync-ed) on generated held-out prompts, its tokens/s next to
      `bench.py spec`'s chain:K figure at the same batch size, measured in the same run.
  python scripts/bench.py hf [--prompts 10 --max-new-tokens 64 --batch 1 8 --k 4]
      ours AR and SD vs Hugging Face transformers (PyTorch) greedy generate and assisted
      generation on the same weights (exported float32) and prompts; tokens compared.
  python scripts/bench.py costmodel [--batch 1 2 4 ... 64 --tokens 1 2 4 8]
      the cost model's calibration check: predicted (cpu-measured preset, calibrated in
      the same run, --passes calibrations interleaved with the sweep's passes) vs
      measured forward times of the decode benchmark's MoE and dense shapes, per point.
  python scripts/bench.py budget [--workload bundled bench-shape --trees tree-31 tree-63
                                  --policies lossless moe_spec --budgets 4 8 16 --batch 1]
      verification-time expert budgets (spec/budget.py) swept over B per tree: unique
      experts/layer, expert MB per verification, acceptance length, agreement with the
      unbudgeted greedy output, tokens/s (moesd_jax/bench_budget.py).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("moe-layer", help="MoE layer time vs number of active experts")
    m.add_argument("--experts", type=int, default=64)
    m.add_argument("--d", type=int, default=1024)
    m.add_argument("--f", type=int, default=1024)
    m.add_argument("--tokens", type=int, default=16)
    m.add_argument("--top-k", type=int, default=4)
    m.add_argument("--backend", default="gather", choices=["gather", "dense", "ragged"])
    m.add_argument("--repeats", type=int, default=20)
    m.add_argument("--json", action="store_true")
    sp = sub.add_parser("spec", help="AR vs SD acceptance and speed on held-out prompts")
    sp.add_argument("--model", default=None, help="target (default: bundled)")
    sp.add_argument("--draft", default=None, help="draft (default: bundled)")
    sp.add_argument("--eagle", default=None,
                    help="EAGLE-3 head directory for the eagle:K / eagle-tree:NAME configs "
                    "(default with the bundled target: the bundled head)")
    sp.add_argument("--configs", nargs="+", default=["chain:4", "tree:tree-15"],
                    help="none, chain:K, ngram:K, tree:NAME, ngram-tree:NAME, eagle:K, "
                    "eagle-tree:NAME")
    sp.add_argument("--prompts", type=int, default=50)
    sp.add_argument("--prompt-tokens", type=int, default=64)
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--batch", type=int, default=10)
    sp.add_argument("--bound", action="store_true",
                    help="batch 1: add the speedup weight traffic alone allows each config "
                    "(counted from this text's routing) and AR's share of the read "
                    "bandwidth measured in the same run")
    sp.add_argument("--json", action="store_true")
    bp = sub.add_parser("batch", help="batch job tokens/s vs bench.py spec at the same B, K")
    bp.add_argument("--model", default=None, help="target (default: bundled)")
    bp.add_argument("--draft", default=None, help="draft (default: bundled)")
    bp.add_argument("--prompts", type=int, default=50)
    bp.add_argument("--batch-size", type=int, default=10)
    bp.add_argument("--k", type=int, default=4, help="draft tokens per step (chain)")
    bp.add_argument("--prompt-tokens", type=int, default=64)
    bp.add_argument("--max-new-tokens", type=int, default=64)
    bp.add_argument("--json", action="store_true")
    hp = sub.add_parser("hf", help="ours AR / SD vs transformers generate / assisted")
    hp.add_argument("--model", default=None, help="target (default: bundled)")
    hp.add_argument("--draft", default=None, help="draft (default: bundled)")
    hp.add_argument("--prompts", type=int, default=10)
    hp.add_argument("--prompt-tokens", type=int, default=64)
    hp.add_argument("--max-new-tokens", type=int, default=64)
    hp.add_argument("--batch", type=int, nargs="+", default=[1, 8],
                    help="batch sizes (must include 1: HF assisted is batch-1 only)")
    hp.add_argument("--k", type=int, default=4, help="draft tokens per round")
    hp.add_argument("--torch-threads", type=int, default=2)
    hp.add_argument("--bench-shape", action="store_true",
                    help="the memory-bound MoE shape of `bench.py decode` (random weights, "
                         "3.6 GB float32) with a random dense draft, random prompts")
    hp.add_argument("--json", action="store_true")
    at = sub.add_parser("attention", help="decode step time vs cache capacity at a fixed "
                        "live context (attention follows the live length)")
    at.add_argument("--model", default=None, help="target (default: bundled)")
    at.add_argument("--context", type=int, default=64)
    at.add_argument("--capacity", type=int, nargs="+", default=[128, 512, 4096])
    at.add_argument("--batch", type=int, default=1)
    at.add_argument("--json", action="store_true")
    dc = sub.add_parser("decode", help="AR vs SD (oracle drafter) over batch x K, MoE vs dense")
    dc.add_argument("--batch", type=int, nargs="+", default=None, help="default 1 2 4 ... 64")
    dc.add_argument("--k", type=int, nargs="+", default=None, help="default 0 1 2 4 8")
    dc.add_argument("--model", choices=["moe", "dense", "both"], default="both")
    dc.add_argument("--oracle-acceptance", type=float, default=0.8)
    dc.add_argument("--repeats", type=int, default=3)
    dc.add_argument("--out-dir", default="docs", help="CSV and PNG go here")
    dc.add_argument("--small", action="store_true",
                    help="a tiny shape (d 64, 2 layers) to check the harness quickly")
    dc.add_argument("--json", action="store_true")
    cm = sub.add_parser("costmodel", help="cost model: predicted vs measured step times")
    cm.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    cm.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8])
    cm.add_argument("--model", choices=["moe", "dense", "both"], default="both")
    cm.add_argument("--context", type=int, default=32)
    cm.add_argument("--repeats", type=int, default=3)
    cm.add_argument("--passes", type=int, default=3,
                    help="calibration + sweep passes, interleaved; medians over passes")
    cm.add_argument("--small", action="store_true",
                    help="a tiny shape (d 64, 2 layers) to check the harness quickly")
    cm.add_argument("--save-calibration", default=None,
                    help="also write the cpu-measured calibration JSON here")
    cm.add_argument("--json", action="store_true")
    ut = sub.add_parser("utility", help="--k auto vs AR and static K on code / shuffled / "
                        "mixed prompts (bundled pair) or the oracle on the bench shape")
    ut.add_argument("--model", default=None, help="target (default: bundled)")
    ut.add_argument("--draft", default=None, help="draft (default: bundled)")
    ut.add_argument("--bench-shape", action="store_true",
                    help="the memory-bound MoE shape of bench.py decode with the oracle "
                    "drafter at --oracle-acceptance (random weights and prompts)")
    ut.add_argument("--oracle-acceptance", type=float, nargs="+", default=[0.8, 0.2])
    ut.add_argument("--prompts", type=int, default=40)
    ut.add_argument("--prompt-tokens", type=int, default=64)
    ut.add_argument("--max-new-tokens", type=int, default=64)
    ut.add_argument("--batch", type=int, default=10)
    ut.add_argument("--workloads", nargs="+", default=["code", "shuffled", "mix"])
    ut.add_argument("--json", action="store_true")
    bu = sub.add_parser("budget", help="expert budgets: B vs experts, bytes, acceptance, "
                        "agreement, tokens/s on trees")
    bu.add_argument("--workload", nargs="+", choices=["bundled", "bench-shape"],
                    default=["bundled", "bench-shape"],
                    help="the bundled pair on held-out prompts and/or the memory-bound "
                    "shape of bench.py decode (random weights, oracle drafter)")
    bu.add_argument("--model", default=None, help="bundled workload: target (default: bundled)")
    bu.add_argument("--draft", default=None, help="bundled workload: draft (default: bundled)")
    bu.add_argument("--trees", nargs="+", default=["tree-31", "tree-63"])
    bu.add_argument("--policies", nargs="+", default=["lossless", "moe_spec"],
                    choices=["lossless", "moe_spec", "mass"])
    bu.add_argument("--budgets", type=int, nargs="+", default=None,
                    help="B values (default: top_k, E/4, E/2, E of each target)")
    bu.add_argument("--mass", type=float, default=0.9, help="fraction for --policies mass")
    bu.add_argument("--batch", type=int, default=1, help="rows per generate call")
    bu.add_argument("--prompts", type=int, default=8)
    bu.add_argument("--prompt-tokens", type=int, default=64)
    bu.add_argument("--max-new", "--max-new-tokens", dest="max_new", type=int, default=64)
    bu.add_argument("--repeats", type=int, default=3)
    bu.add_argument("--oracle-acceptance", type=float, default=0.8)
    bu.add_argument("--small", action="store_true",
                    help="bench-shape: the tiny shape (d 64, 2 layers, E 8) to check quickly")
    bu.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from moesd_jax import benchmarks
    from moesd_jax.runtime import keep_host_buffers

    keep_host_buffers()

    if args.cmd == "spec":
        return spec_cmd(args, benchmarks)
    if args.cmd == "decode":
        return decode_cmd(args)
    if args.cmd == "budget":
        return budget_cmd(args)
    if args.cmd == "costmodel":
        return costmodel_cmd(args)
    if args.cmd == "utility":
        return utility_cmd(args)
    if args.cmd == "attention":
        return attention_cmd(args)
    if args.cmd == "hf":
        return hf_cmd(args)
    if args.cmd == "batch":
        return batch_cmd(args, benchmarks)
    if args.cmd == "moe-layer":
        if args.top_k > args.experts or min(args.experts, args.d, args.f, args.tokens) < 1:
            print(f"error: need 1 <= --top-k={args.top_k} <= --experts={args.experts} and "
                  "positive sizes", file=sys.stderr)
            return 2
        bw = benchmarks.memcpy_bandwidth()
        rows = benchmarks.moe_layer(args.experts, args.d, args.f, args.tokens, args.top_k,
                                    backend=args.backend, repeats=args.repeats)
        if args.json:
            print(json.dumps({"memcpy_gb_per_s": bw / 1e9, "rows": rows}))
            return 0
        print(f"# moe-layer backend={args.backend} E={args.experts} D={args.d} F={args.f} "
              f"tokens={args.tokens} top_k={args.top_k}; memcpy (read+write) "
              f"{bw / 1e9:.1f} GB/s")
        print(f"{'active':>6} {'ms':>9} {'MB read':>9} {'GB/s':>7} {'of memcpy':>9}")
        for r in rows:
            print(f"{r['active']:>6} {r['ms']:>9.3f} {r['weight_bytes'] / 1e6:>9.1f} "
                  f"{r['gb_per_s']:>7.2f} {r['gb_per_s'] * 1e9 / bw:>9.0%}")
    return 0


def attention_cmd(args) -> int:
    from flax import nnx

    from moesd_jax.bench_decode import forward_time
    from moesd_jax.runtime import load_models

    if args.context < 1 or args.batch < 1 or min(args.capacity) <= args.context:
        print(f"error: need --context={args.context} >= 1, --batch={args.batch} >= 1 and "
              f"every --capacity {args.capacity} > --context", file=sys.stderr)
        return 2
    lm = load_models(args.model, None, "none")
    g, st = nnx.split(lm.target)
    rows = []
    for cap in args.capacity:
        ms = forward_time(g, st, lm.target.cfg, args.batch, 1, args.context, cap,
                          repeats=30)[0] * 1e3
        rows.append({"capacity": cap, "context": args.context, "batch": args.batch,
                     "step_ms": ms, "over_smallest": ms / (rows[0]["step_ms"] if rows else ms)})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"# attention: one T=1 decode forward of {lm.target_path}, batch {args.batch}, "
          f"{args.context} cached tokens, cache capacity varied (median of 30)")
    print(f"{'capacity':>9} {'step ms':>8} {'x smallest':>10}")
    for r in rows:
        print(f"{r['capacity']:>9} {r['step_ms']:>8.2f} {r['over_smallest']:>10.2f}")
    return 0


def _printer(as_json: bool, fmt):
    """A progress callback: each row as one JSON line (``--json``), or ``fmt(row)``."""

    def show(r):
        print(json.dumps(r) if as_json else fmt(r), flush=True)

    return show


def decode_cmd(args) -> int:
    from moesd_jax import bench_decode as bd

    batches = args.batch or list(bd.BATCHES)
    ks = args.k or list(bd.KS)
    if min(batches) < 1 or min(ks) < 0 or max(ks) > 16:
        print(f"error: --batch {batches} must be >= 1 and --k {ks} in [0, 16]", file=sys.stderr)
        return 2
    if not 0.0 <= args.oracle_acceptance <= 1.0 or args.repeats < 1:
        print(f"error: --oracle-acceptance={args.oracle_acceptance} must be in [0, 1] and "
              f"--repeats={args.repeats} >= 1", file=sys.stderr)
        return 2
    models = ["moe", "dense"] if args.model == "both" else [args.model]
    configs = (bd.bench_configs(d_model=64, layers=2, experts=8, top_k=2, expert_dim=64,
                                vocab=512) if args.small else bd.bench_configs())
    if not args.json:
        c = configs["moe"]
        print(f"# decode: MoE d={c.d_model} L={c.num_layers} E={c.moe.num_experts} "
              f"top-{c.moe.top_k} F={c.moe.expert_dim} V={c.vocab_size} vs dense of equal "
              f"active size, float32, random weights, oracle acceptance "
              f"{args.oracle_acceptance}")
        print(f"{'model':>5} {'B':>3} {'K':>2} {'AR tok/s':>9} {'SD tok/s':>9} {'speedup':>7} "
              f"{'acc len':>7} {'ver/step':>8} {'MB/step':>8} {'GB/s':>6} {'of read':>7} "
              f"{'==AR':>5} {'pred spd':>8} {'pred v/s':>8}", flush=True)

    def fmt(r):
        return (f"{r['model']:>5} {r['batch']:>3} {r['k']:>2} {r['ar_tok_per_s']:>9.1f} "
               f"{r['sd_tok_per_s']:>9.1f} {r['sd_speedup']:>7.2f} "
               f"{r['mean_acceptance_length']:>7.2f} {r['verify_over_step']:>8.2f} "
               f"{r['active_weight_bytes_per_step'] / 1e6:>8.0f} "
               f"{r['active_weight_gb_per_s']:>6.1f} {r['bandwidth_fraction']:>7.0%} "
               f"{str(r['tokens_equal']):>5} {r['predicted_sd_speedup']:>8.2f} "
               f"{r['predicted_verify_over_step']:>8.2f}")

    show = _printer(args.json, fmt)

    from moesd_jax.analysis.cost_model import calibrate_cpu

    hw = calibrate_cpu()  # the cost model's predictions for each point, same run
    rows = bd.decode_sweep(models, batches, ks, args.oracle_acceptance, repeats=args.repeats,
                           configs=configs, progress=show, hw=hw)
    paths = bd.write_outputs(rows, args.out_dir)
    if not args.json:
        print(f"# read bandwidth {rows[0]['read_bandwidth_gb_per_s']:.1f} GB/s (XLA sum; numpy "
              f"sum {rows[0]['numpy_read_gb_per_s']:.1f}); "
              f"peak RSS {max(r['peak_rss_gb'] for r in rows):.2f} GB; wrote "
              + ", ".join(str(p) for p in paths))
    return 0 if all(r["tokens_equal"] for r in rows) else 1


def utility_cmd(args) -> int:
    import os

    import numpy as np

    from moesd_jax import bench_utility as bu
    from moesd_jax.config import ConfigError

    if min(args.prompts, args.batch, args.max_new_tokens) < 1 or any(
            not 0 <= a <= 1 for a in args.oracle_acceptance):
        print(f"error: --prompts={args.prompts}, --batch={args.batch} and --max-new-tokens="
              f"{args.max_new_tokens} must be >= 1, --oracle-acceptance "
              f"{args.oracle_acceptance} in [0, 1]", file=sys.stderr)
        return 2
    rows = []

    def fmt(r):
        extra = (f"  decisions {r['auto_decisions']}: K=0 {r['auto_k0_share']:.0%}, mean K "
                 f"{r['auto_mean_k']:.2f}; cost(K) {r['auto_costs']}"
                 if r["config"] == "auto" else "")
        return (f"{r['workload']:>10} {r['config']:>5} {r['tokens_per_s']:>8.1f} "
               f"{r['speedup']:>7.2f} {r['mean_acceptance_length']:>7.2f} "
               f"{str(r['equal_to_ar']):>5}{extra}")

    show = _printer(args.json, fmt)

    header = (f"{'workload':>10} {'K':>5} {'tok/s':>8} {'vs AR':>7} {'acc len':>7} "
              f"{'==AR':>5}")
    try:
        if args.bench_shape:
            from flax import nnx

            from moesd_jax.bench_decode import bench_configs
            from moesd_jax.models.transformer import Transformer
            from moesd_jax.runtime import cpu_decode_layout

            cfg = bench_configs()["moe"]
            target = Transformer(cfg, nnx.Rngs(0))
            cpu_decode_layout(target)
            rng = np.random.default_rng(0)
            prompts = rng.integers(1, cfg.vocab_size, (args.prompts, 16)).tolist()
            if not args.json:
                print(f"# utility: bench MoE shape (d 1024, 8 layers, 32 experts top-4, "
                      f"float32, random weights), oracle drafter, {args.prompts} prompts x "
                      f"{args.max_new_tokens} tokens, batch {args.batch}, greedy; load "
                      f"average {os.getloadavg()[0]:.1f}")
                print(header)
            for a in args.oracle_acceptance:
                rows += bu.utility_sweep(target, None, "oracle", {f"oracle-{a}": prompts},
                                         max_new=args.max_new_tokens, batch=args.batch,
                                         oracle_acceptance=a, progress=show)
        else:
            from moesd_jax.data import heldout_prompts
            from moesd_jax.runtime import load_models

            lm = load_models(args.model, args.draft, "draft")
            tok = lm.tokenizer
            texts = heldout_prompts(tok, n=args.prompts, prompt_tokens=args.prompt_tokens)
            loads = bu.workloads([tok.encode(t) for t in texts])
            loads = {w: loads[w] for w in args.workloads}
            if not args.json:
                print(f"# utility: {args.prompts} held-out prompts x {args.max_new_tokens} "
                      f"tokens, batch {args.batch}, greedy; target {lm.target_path}, draft "
                      f"{lm.draft_path}; load average {os.getloadavg()[0]:.1f}")
                print(header)
            rows += bu.utility_sweep(lm.target, lm.draft, "draft", loads,
                                     max_new=args.max_new_tokens, batch=args.batch,
                                     progress=show)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verdict = []
    for w in dict.fromkeys(r["workload"] for r in rows):
        auto = next(r for r in rows if r["workload"] == w and r["config"] == "auto")
        verdict.append({"workload": w, "auto_vs_ar": auto["speedup"],
                        "auto_vs_best_static": auto["vs_best_static"],
                        "ok": auto["speedup"] >= 0.95 and auto["vs_best_static"] >= 0.95})
    if args.json:
        print(json.dumps({"verdict": verdict}))
    else:
        for v in verdict:
            print(f"# {v['workload']}: auto {v['auto_vs_ar']:.2f}x AR, "
                  f"{v['auto_vs_best_static']:.2f}x the best static config -> "
                  f"{'ok' if v['ok'] else 'NOT within 5%'}")
    return 0 if all(r["equal_to_ar"] for r in rows) else 1


def costmodel_cmd(args) -> int:
    import os
    import statistics

    from moesd_jax import bench_decode as bd
    from moesd_jax.analysis import cost_model

    if min(args.batch) < 1 or min(args.tokens) < 1 or args.context < 0 or args.repeats < 1:
        print(f"error: --batch {args.batch} and --tokens {args.tokens} must be >= 1, "
              f"--context={args.context} >= 0, --repeats={args.repeats} >= 1", file=sys.stderr)
        return 2
    if args.passes < 1:
        print(f"error: --passes={args.passes} must be >= 1", file=sys.stderr)
        return 2
    models = ["moe", "dense"] if args.model == "both" else [args.model]
    configs = (bd.bench_configs(d_model=64, layers=2, experts=8, top_k=2, expert_dim=64,
                                vocab=512) if args.small else bd.bench_configs())
    load0 = os.getloadavg()[0]

    def fmt(r):
        tr = (f"{r['predicted_traced_ms']:>8.2f} {r['error_traced']:>+6.0%} "
              f"{r['unique_experts']:>5.1f} {r['unique_experts_independent']:>5.1f}"
              if "unique_experts" in r else f"{'':>8} {'':>6} {'':>5} {'':>5}")
        return (f"{r['model']:>5} {r['batch']:>3} {r['tokens']:>2} {r['measured_ms']:>11.2f} "
               f"{r['measured_spread']:>6.0%} {r['predicted_ms']:>9.2f} {r['error']:>+6.0%} "
               f"{tr} {r['expert_fraction']:>7.0%}")

    show = _printer(args.json, fmt)

    # calibration passes interleaved with the sweep's (bench_decode.costmodel_sweep)
    rows, hw = bd.costmodel_sweep(None, models, args.batch, args.tokens, args.context,
                                  args.repeats, configs, passes=args.passes,
                                  calibrate=lambda: cost_model.calibrate_cpu(passes=1))
    if args.save_calibration:
        with open(args.save_calibration, "w") as f:
            json.dump(hw.to_json(), f, indent=1)
    if not args.json:
        c = configs["moe"]
        print(f"# costmodel: MoE d={c.d_model} L={c.num_layers} E={c.moe.num_experts} "
              f"top-{c.moe.top_k} F={c.moe.expert_dim} V={c.vocab_size} and the dense model "
              f"of equal active size, float32, context {args.context}; {args.passes} passes, "
              f"each a calibration then every point (median of {args.repeats} forwards); "
              f"medians over passes; load average {load0:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after")
        cold = {r: t for nb, r, t in hw.dots_cold if nb == 4 << 20}
        print(f"# cpu-measured: read {hw.mem_bandwidth / 1e9:.1f} GB/s; a [rows,1024]x"
              f"[1024,1024] dot from memory, ms by rows: "
              + " ".join(f"{r}:{t * 1e3:.2f}" for r, t in sorted(cold.items()))
              + f"; overhead {hw.step_overhead_s * 1e3:.3f} ms/step + "
              f"{hw.layer_overhead_s * 1e3:.3f} ms/layer; cache {hw.cache_bytes >> 20} MB; "
              f"attention core {hw.attn_unit_s * 1e6:.1f} us per (row, kv head, block) + "
              f"{hw.attn_elem_s * 1e9:.1f} ns per query element")
        print(f"{'model':>5} {'B':>3} {'T':>2} {'measured ms':>11} {'spread':>6} "
              f"{'predicted':>9} {'error':>6} {'traced':>8} {'error':>6} {'uniq':>5} "
              f"{'indep':>5} {'expert%':>7}", flush=True)
    for r in rows:
        show(r)
    errs = [abs(r["error"]) for r in rows]
    within = sum(e <= 0.25 for e in errs)
    summary = {"points": len(rows), "within_25pct": within,
               "median_abs_error": statistics.median(errs), "max_abs_error": max(errs)}
    if args.json:
        print(json.dumps({"summary": summary, "hardware": hw.to_json()}))
    else:
        print(f"# {within}/{len(rows)} points within 25%; median |error| "
              f"{summary['median_abs_error']:.0%}, max {summary['max_abs_error']:.0%}")
    return 0


def step_costs(lm, args) -> dict:
    """Per-step costs behind the spec table: target T=1 and T=5 forwards, draft T=1."""
    from flax import nnx

    from moesd_jax.bench_decode import forward_time

    ctx = args.prompt_tokens + args.max_new_tokens // 2
    cap = -(-(args.prompt_tokens + args.max_new_tokens + 32) // 128) * 128
    out = {}
    for name, m in (("target", lm.target), ("draft", lm.draft)):
        if m is None:
            continue
        g, st = nnx.split(m)
        for t in ((1, 5) if name == "target" else (1,)):
            out[f"{name} T={t} ms"] = forward_time(g, st, m.cfg, args.batch, t, ctx, cap,
                                                    repeats=20)[0] * 1e3
    out["draft_over_target"] = out.get("draft T=1 ms", 0.0) / out["target T=1 ms"]
    out["verify5_over_step"] = out["target T=5 ms"] / out["target T=1 ms"]
    return out


def budget_cmd(args) -> int:
    from moesd_jax import bench_budget
    from moesd_jax.config import ConfigError, SpecConfig
    from moesd_jax.spec.tree import load_tree

    if min(args.batch, args.prompts, args.max_new, args.repeats) < 1 or not (
            0.0 <= args.oracle_acceptance <= 1.0):
        print("error: --batch, --prompts, --max-new and --repeats must be >= 1 and "
              "--oracle-acceptance in [0, 1]", file=sys.stderr)
        return 2

    def fmt(r):
        return (f"{r['workload']:>11} {r['tree']:>8} {r['policy']:>8} {r['b']:>3} "
               f"{r['unique_experts']:>7.2f} {r['natural_unique']:>7.2f} "
               f"{r['expert_mb_per_verify']:>8.2f} {r['acceptance_length']:>7.3f} "
               f"{r['agreement']:>6.3f} {r['mass_kept']:>6.3f} {r['nodes_pruned']:>6} "
               f"{r['tokens_per_s']:>8.1f} {r['speedup']:>6.2f}")

    show = _printer(args.json, fmt)

    if not args.json:
        print(f"# budget: greedy, batch {args.batch}, {args.prompts} prompts x {args.max_new} "
              f"new tokens, {args.repeats} timed repeats (median); agreement = token match "
              "rate with the unbudgeted greedy output")
        print(f"{'workload':>11} {'tree':>8} {'policy':>8} {'B':>3} {'uniq/L':>7} "
              f"{'nat/L':>7} {'MB/verif':>8} {'acc len':>7} {'agree':>6} {'mass':>6} "
              f"{'pruned':>6} {'tok/s':>8} {'spdup':>6}", flush=True)
    try:
        for wl in args.workload:
            if wl == "bundled":
                from moesd_jax.data import heldout_prompts
                from moesd_jax.runtime import load_models

                lm = load_models(args.model, args.draft, "draft")
                texts = heldout_prompts(lm.tokenizer, n=args.prompts,
                                        prompt_tokens=args.prompt_tokens)
                target, draft = lm.target, lm.draft
                prompts, ref = [lm.tokenizer.encode(t) for t in texts], None
            else:  # one model and reference for every tree (deep enough for the deepest)
                depth = max(load_tree(t).depth for t in args.trees)
                target, prompts, ref = bench_budget.bench_shape_workload(
                    args.small, args.prompts, min(args.prompt_tokens, 64), args.max_new, depth)
                draft = None
            for tree in args.trees:
                if wl == "bench-shape":
                    spec = SpecConfig(method="oracle", tree=tree,
                                      oracle_acceptance=args.oracle_acceptance)
                else:
                    spec = SpecConfig(method="draft", tree=tree)
                m = target.cfg.moe
                budgets = args.budgets or sorted({m.top_k, max(m.top_k, m.num_experts // 4),
                                                  max(m.top_k, m.num_experts // 2),
                                                  m.num_experts})
                bench_budget.budget_sweep(
                    target, draft, spec, prompts, budgets=budgets, policies=args.policies,
                    mass=args.mass, max_new=args.max_new, repeats=args.repeats,
                    batch=args.batch, oracle_reference=ref,
                    progress=lambda r, wl=wl, tree=tree: show({"workload": wl, "tree": tree,
                                                               **r}))
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def spec_cmd(args, benchmarks) -> int:
    from moesd_jax.config import ConfigError
    from moesd_jax.data import heldout_prompts
    from moesd_jax.runtime import load_models

    try:
        lm = load_models(args.model, args.draft, "draft")
        tok = lm.tokenizer
        texts = heldout_prompts(tok, n=args.prompts, prompt_tokens=args.prompt_tokens)
        prompts = [tok.encode(t) for t in texts]
        head = None
        if (not args.eagle and not args.model
                and any(c.startswith("eagle") for c in args.configs)):
            from moesd_jax.checkpoint import bundled_model_dir

            args.eagle = str(bundled_model_dir("eagle"))  # the bundled target's head
        if args.eagle:
            from moesd_jax.runtime import head_as_target
            from moesd_jax.spec.eagle_io import load_eagle

            head = head_as_target(load_eagle(args.eagle, lm.target.cfg), lm.target)
        if args.bound and args.batch != 1:
            raise ValueError(f"--bound counts one row's traffic: it needs --batch 1, got "
                             f"--batch {args.batch}")
        rows = benchmarks.spec_sweep(lm.target, lm.draft, prompts, args.configs,
                                     args.max_new_tokens, args.batch, eagle=head)
        bound = (benchmarks.traffic_bounds(lm.target, lm.draft, prompts, rows,
                                           args.max_new_tokens, eagle=head)
                 if args.bound else None)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if bound:
        for r in rows:
            r["traffic_bound"] = bound["configs"][r["config"]]["bound"]
    if args.json:
        print(json.dumps({"rows": rows, "step_costs": step_costs(lm, args),
                          "traffic": bound}))
        return 0
    print(f"# spec: {len(prompts)} held-out prompts x {args.max_new_tokens} new tokens, "
          f"greedy, batch {args.batch}; target {lm.target_path}, draft {lm.draft_path}")
    costs = step_costs(lm, args)
    print("# step costs (jitted forward, median): " + ", ".join(
        f"{k} {v:.2f} ms" for k, v in costs.items() if k.endswith("ms")) +
        f"; draft/target step ratio {costs['draft_over_target']:.2f}, verify(T=5)/step(T=1) "
        f"{costs['verify5_over_step']:.2f}")
    if bound:
        share = bound["ar_gb_per_s"] / bound["read_gb_per_s"]
        uniq = ", ".join(f"T={t}: {u:.2f}" for t, u in bound["unique_experts"].items())
        drafts = ", ".join(f"{k} {v:.1f} MB" for k, v in bound["draft_mb"].items())
        print(f"# weight traffic (batch 1, this text's routing): AR step {bound['ar_mb']:.1f} "
              f"MB, AR {bound['ar_gb_per_s']:.1f} GB/s = {share:.0%} of the read bandwidth "
              f"measured now ({bound['read_gb_per_s']:.1f} GB/s); unique experts per layer "
              f"by verified tokens {uniq}; one draft forward: {drafts}; bound = accept len x "
              "AR step bytes / iteration bytes")
    extra = f" {'bound':>6}" if bound else ""
    print(f"{'config':>14} {'accept len':>10} {'tok/s':>8} {'speedup':>8} {'== AR':>6}{extra}")
    for r in rows:
        extra = f" {r['traffic_bound']:>6.2f}" if bound else ""
        print(f"{r['config']:>14} {r['mean_acceptance_length']:>10.3f} "
              f"{r['tokens_per_s']:>8.1f} {r['speedup']:>8.2f} {str(r['equal_to_ar']):>6}"
              f"{extra}")
    return 0


def batch_cmd(args, benchmarks) -> int:
    from moesd_jax.config import ConfigError
    from moesd_jax.data import heldout_prompts
    from moesd_jax.runtime import load_models

    try:
        if min(args.prompts, args.batch_size, args.prompt_tokens, args.max_new_tokens) < 1:
            raise ValueError(f"--prompts={args.prompts}, --batch-size={args.batch_size}, "
                             f"--prompt-tokens={args.prompt_tokens} and --max-new-tokens="
                             f"{args.max_new_tokens} must be >= 1")
        if args.k < 1:
            raise ValueError(f"--k={args.k} must be >= 1")
        lm = load_models(args.model, args.draft, "draft", k=args.k)
        tok = lm.tokenizer
        if tok is None:
            raise ValueError(f"{lm.target_path} has no tokenizer: held-out prompts need one")
        # the held-out files give ~500 distinct prompts; larger jobs cycle through them
        texts = heldout_prompts(tok, n=min(args.prompts, 500), prompt_tokens=args.prompt_tokens)
        prompts = [tok.encode(texts[i % len(texts)]) for i in range(args.prompts)]
        res = benchmarks.batch_job_vs_spec(lm.target, lm.draft, prompts, args.k,
                                           args.max_new_tokens, args.batch_size, tok)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"# batch: {res['prompts']} held-out prompts x {args.max_new_tokens} new tokens, "
          f"greedy, batch {args.batch_size}, chain K={args.k}; target {lm.target_path}, "
          f"draft {lm.draft_path}")
    print(f"{'':>22} {'tok/s':>8} {'accept len':>10}")
    print(f"{'batch job':>22} {res['job_tokens_per_s']:>8.1f} "
          f"{res['job_mean_acceptance_length']:>10.3f}")
    print(f"{'bench.py spec chain:K':>22} {res['spec_tokens_per_s']:>8.1f} "
          f"{res['spec_mean_acceptance_length']:>10.3f}")
    print(f"# job / spec = {res['job_over_spec']:.2f}; AR (spec's baseline) "
          f"{res['ar_tokens_per_s']:.1f} tok/s; job tokens == spec tokens: "
          f"{res['tokens_equal']}")
    return 0


def hf_cmd(args) -> int:
    from moesd_jax.bench_hf import compare_hf, format_table, validate_args
    from moesd_jax.config import ConfigError
    from moesd_jax.data import heldout_prompts
    from moesd_jax.runtime import load_models

    try:
        if args.prompt_tokens < 1:
            raise ValueError(f"--prompt-tokens={args.prompt_tokens} must be >= 1")
        validate_args(args.prompts, args.max_new_tokens, args.batch, args.k,
                      args.torch_threads)
        if args.bench_shape:
            if args.model or args.draft:
                raise ValueError("--bench-shape builds its own pair; drop --model/--draft")
            import numpy as np

            from moesd_jax.bench_decode import bench_shape_pair

            target, draft = bench_shape_pair()
            rng = np.random.default_rng(0)
            prompts = rng.integers(1, target.cfg.vocab_size,
                                   (args.prompts, args.prompt_tokens)).tolist()
            where = ("bench MoE shape (d 1024, 8 layers, 32 experts top-4, vocab 32000, "
                     "random weights) and a random 2-layer dense draft (d 256)")
        else:
            lm = load_models(args.model, args.draft, "draft")
            tok = lm.tokenizer
            if tok is None:
                raise ValueError(f"{lm.target_path} has no tokenizer: held-out prompts need "
                                 "one")
            texts = heldout_prompts(tok, n=args.prompts, prompt_tokens=args.prompt_tokens)
            prompts = [tok.encode(t) for t in texts]
            target, draft = lm.target, lm.draft
            where = f"target {lm.target_path}, draft {lm.draft_path}"
        res = compare_hf(target, draft, prompts, args.max_new_tokens, args.batch,
                         k=args.k, torch_threads=args.torch_threads)
    except (ValueError, ConfigError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
        return 0
    load = " -> ".join("n/a" if x is None else f"{x:.1f}" for x in res["load_avg_1m"])
    print(f"# hf: {res['prompts']} prompts x {res['max_new_tokens']} new tokens, "
          f"greedy, float32 weights on both sides, K={res['k']}; torch "
          f"{res['torch_version']} (threads={res['torch_threads']}), transformers "
          f"{res['transformers_version']}; {res['cpus']} CPUs, load average "
          f"{load}; {where}")
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
