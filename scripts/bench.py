#!/usr/bin/env python
"""Benchmarks. Speed claims live here, never in unit tests.

  python scripts/bench.py moe-layer [--experts 64 --d 1024 --f 1024 --tokens 16 --top-k 4]
      step time of one MoE layer vs active experts, bytes moved, and this machine's
      memcpy bandwidth measured in the same run.
  python scripts/bench.py spec [--configs none chain:4 tree:tree-15 ngram:4 --prompts 50]
      greedy AR vs SD on held-out code prompts with the bundled pair (or --model/--draft):
      mean acceptance length, tokens/s, speedup (ratio of medians in one run).
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
    sp.add_argument("--configs", nargs="+", default=["chain:4", "tree:tree-15"],
                    help="none, chain:K, ngram:K or tree:NAME")
    sp.add_argument("--prompts", type=int, default=50)
    sp.add_argument("--prompt-tokens", type=int, default=64)
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--batch", type=int, default=10)
    sp.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from moesd_jax import benchmarks

    if args.cmd == "spec":
        return spec_cmd(args, benchmarks)
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


def spec_cmd(args, benchmarks) -> int:
    from moesd_jax.config import ConfigError
    from moesd_jax.data import heldout_prompts
    from moesd_jax.runtime import load_models

    try:
        lm = load_models(args.model, args.draft, "draft")
        tok = lm.tokenizer
        texts = heldout_prompts(tok, n=args.prompts, prompt_tokens=args.prompt_tokens)
        prompts = [tok.encode(t) for t in texts]
        rows = benchmarks.spec_sweep(lm.target, lm.draft, prompts, args.configs,
                                     args.max_new_tokens, args.batch)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"# spec: {len(prompts)} held-out prompts x {args.max_new_tokens} new tokens, "
          f"greedy, batch {args.batch}; target {lm.target_path}, draft {lm.draft_path}")
    print(f"{'config':>14} {'accept len':>10} {'tok/s':>8} {'speedup':>8} {'== AR':>6}")
    for r in rows:
        print(f"{r['config']:>14} {r['mean_acceptance_length']:>10.3f} "
              f"{r['tokens_per_s']:>8.1f} {r['speedup']:>8.2f} {str(r['equal_to_ar']):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
