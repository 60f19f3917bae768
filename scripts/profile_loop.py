#!/usr/bin/env python
"""Profile one whole decode call: self time per op scope (moesd_jax/profiling.py).

    python scripts/profile_loop.py                              # bundled pair, chain-4
    python scripts/profile_loop.py --spec none                  # AR
    python scripts/profile_loop.py --spec eagle --draft runs/eagle/final --k 4
    python scripts/profile_loop.py --spec eagle --random-head   # a head's cost, untrained
    python scripts/profile_loop.py --batch 10 --depth 2 --json

Held-out prompts of ``--prompt-tokens`` tokens, greedy. Profile on a quiet machine; the
table is for shares (what to fix), ``scripts/bench.py`` for speed claims.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="target (default: the bundled one)")
    ap.add_argument("--draft", default=None, help="draft model or EAGLE head directory")
    ap.add_argument("--spec", choices=["none", "draft", "ngram", "eagle"], default="draft")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tree", default=None)
    ap.add_argument("--random-head", action="store_true",
                    help="--spec eagle with an untrained head (its cost, not its drafts)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3, help="scope parts kept (verify/moe/...)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for name in ("batch", "prompt_tokens", "max_new_tokens", "depth", "top", "k"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')}={getattr(args, name)} must be >= 1",
                  file=sys.stderr)
            return 2
    if args.random_head and (args.spec != "eagle" or args.draft):
        print("error: --random-head goes with --spec eagle and no --draft", file=sys.stderr)
        return 2

    from moesd_jax.config import ConfigError, SpecConfig
    from moesd_jax.runtime import keep_host_buffers, load_models

    keep_host_buffers()
    from moesd_jax.data import heldout_prompts
    from moesd_jax.profiling import profile_generate
    from moesd_jax.spec.decoder import SpecDecoder

    try:
        lm = load_models(args.model, args.draft, "none" if args.random_head else args.spec,
                         k=args.k, tree=args.tree)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    draft = lm.draft
    if args.spec == "eagle" and args.random_head:
        from flax import nnx

        from moesd_jax.spec.eagle import EagleConfig, EagleHead

        draft = EagleHead(EagleConfig.for_target(lm.target.cfg, param_dtype="float32"),
                          nnx.Rngs(0))
    spec_cfg = (SpecConfig(method="none") if args.spec == "none" else
                SpecConfig(method=args.spec, k=args.k, tree=args.tree))
    dec = SpecDecoder(lm.target, draft if args.spec in ("draft", "eagle") else None, spec_cfg)
    texts = heldout_prompts(lm.tokenizer, n=args.batch, prompt_tokens=args.prompt_tokens)
    prompts = [lm.tokenizer.encode(t) for t in texts]
    report = profile_generate(dec, prompts, args.max_new_tokens, depth=args.depth)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        what = args.spec if args.spec == "none" else f"{args.spec} k={args.k} tree={args.tree}"
        print(f"# {what}, batch {args.batch}, prompts of {args.prompt_tokens} tokens")
        print(report.table(top=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
