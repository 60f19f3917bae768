"""Generate with autoregressive or speculative decoding.

Examples:
  moesd-generate --prompt 'def fibonacci(n):' --max-new-tokens 48
  moesd-generate --model CKPT_OR_HF_DIR --spec ngram --k 4 --prompt-ids 1,2,3 --json
  moesd-generate --mesh ep --prompt 'import os'   # configs/mesh/ep.yaml
  moesd-generate --tree tree-31 --budget lossless --budget-b 4 --prompt 'def f(x):'
  moesd-generate --budget moe_spec --budget-b 4 --budget-min-agreement 0.9 --prompt ...

``--budget-min-agreement`` calibrates on the run's own prompts (greedy, up to
``--max-new-tokens``): the unbudgeted output is decoded once, then each budget of the
fallback ladder until one agrees enough; the chosen budget is printed to stderr.

The same command runs as ``python scripts/generate.py`` from a checkout or ``python -m
moesd_jax.cli.generate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r} must be comma-separated "
                                         "integers") from None


def parse_k(text: str):
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k {text!r} must be an integer or 'auto'") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="orbax checkpoint or HF directory (default: bundled)")
    ap.add_argument("--draft", help="draft checkpoint or HF dir (default: bundled draft); "
                    "with --spec eagle an EAGLE-3 head directory")
    ap.add_argument("--spec", choices=["none", "draft", "ngram", "eagle"], default=None)
    ap.add_argument("--k", type=parse_k, default=4,
                    help="draft tokens per iteration, or 'auto' (utility-driven: each "
                    "request drafts 1, 2 or 4 tokens or none, whichever its measured utility "
                    "favours; spec/utility.py)")
    ap.add_argument("--auto-costs", choices=["measured", "model"], default="measured",
                    help="with --k auto: iteration costs timed at warm-up, or the cost model")
    ap.add_argument("--tree", default=None, help="tree name in configs/spec or a YAML path")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    ap.add_argument("--prompt-ids", action="append", type=parse_ids, default=[],
                    help="comma-separated token ids (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=None,
                    help="cache capacity per row (default: sized from the prompts and "
                         "--max-new-tokens)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0,
                    help="row r (prompt r) samples with row_seed(SEED, r): repeated prompts "
                         "give independent samples, the same SEED the same ones")
    ap.add_argument("--dispatch", default=None, help="MoE dispatch backend override")
    ap.add_argument("--mesh", default=None, help="sharding strategy (configs/mesh)")
    ap.add_argument("--json", action="store_true", help="one JSON object per prompt")
    ap.add_argument("--routing-trace", default=None, metavar="FILE.npz",
                    help="also record each prompt's routing per verify step ([steps, tokens, "
                    "layers, top_k] expert ids; analysis/routing.py) into this file, for "
                    "scripts/analyze_routing.py --traces")
    from moesd_jax.cli.budget_args import add_budget_arguments

    add_budget_arguments(ap)
    args = ap.parse_args(argv)

    from moesd_jax.config import ConfigError
    from moesd_jax.runtime import keep_host_buffers
    from moesd_jax.spec.decoder import SpecDecoder

    keep_host_buffers()

    try:
        if not args.prompt and not args.prompt_ids:
            raise ValueError("give at least one --prompt or --prompt-ids")
        lm = load(args)
        tok = lm.tokenizer
        prompts = list(args.prompt_ids)
        if args.prompt:
            if tok is None:
                raise ValueError(f"--prompt needs a tokenizer and {lm.target_path} has none; "
                                 "use --prompt-ids")
            prompts = [tok.encode(p) for p in args.prompt] + prompts
        spec = lm.spec
        if spec.budget.min_agreement is not None:
            from moesd_jax.spec.budget import calibrate

            gate = calibrate(lm.target, lm.draft, spec, prompts, args.max_new_tokens,
                             decoder_kwargs=dict(max_len=args.max_len, mesh=args.mesh))
            spec = dataclasses.replace(spec, budget=gate.budget)
            print(f"# budget gate: {gate.budget.policy} B={gate.budget.b} agreement="
                  f"{gate.agreement:.3f} (tried {gate.tried})", file=sys.stderr)
        dec = SpecDecoder(lm.target, lm.draft, spec, max_len=args.max_len, mesh=args.mesh)
        kw = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed)
        if args.routing_trace:
            from moesd_jax.analysis import routing

            if args.mesh:
                raise ValueError("--routing-trace runs on one device; drop --mesh")
            traces, results = routing.record_traces(dec, prompts, args.max_new_tokens, **kw)
            m = lm.target.cfg.moe
            routing.save_traces(args.routing_trace, traces, m.num_experts, m.top_k)
        else:
            results = dec.generate(prompts, args.max_new_tokens, **kw)
    except (ValueError, ConfigError, FileNotFoundError) as e:
        from moesd_jax.cli.budget_args import option_names

        print(f"error: {option_names(str(e))}", file=sys.stderr)
        return 2
    from moesd_jax.distributed import is_primary

    if not is_primary():  # every process decodes; the first one prints
        return 0
    for p, r in zip(prompts, results):
        text = tok.decode(r.token_ids) if tok is not None else None
        if args.json:
            print(json.dumps({"prompt_ids": [int(x) for x in p], "token_ids": r.token_ids,
                              "text": text, "stats": r.stats}))
        else:
            print(text if text is not None else r.token_ids)
            print(f"# {r.stats}", file=sys.stderr)
    return 0


def load(args):
    from moesd_jax.cli.budget_args import budget_from_args
    from moesd_jax.runtime import load_models

    if args.mesh:  # joins a multi-process run when JAX_COORDINATOR_ADDRESS etc. are set
        from moesd_jax.distributed import initialize_distributed

        initialize_distributed()
    auto = args.k == "auto"
    return load_models(args.model, args.draft, args.spec, k=4 if auto else args.k,
                       tree=args.tree, dispatch=args.dispatch, mesh=args.mesh, auto=auto,
                       auto_costs=args.auto_costs, spec_budget=budget_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
