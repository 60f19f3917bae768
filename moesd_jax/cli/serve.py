"""OpenAI-compatible server (``/v1/completions``, ``/v1/chat/completions``, ``/metrics``).

With no arguments it serves the bundled target with the bundled draft model::

    moesd-serve                       # http://127.0.0.1:8000/v1
    moesd-serve --model ckpt/ --spec ngram --k 4 --slots 8 --port 8080
    moesd-serve --tree tree-31 --budget lossless --budget-b 8   # server-wide budget

    curl http://127.0.0.1:8000/v1/completions -H 'content-type: application/json' \\
      -d '{"prompt": "def main(", "max_tokens": 32, "temperature": 0}'

An expert budget (``--budget``) is server-wide: the kept experts are chosen over every
row of a verification forward, and each B is its own compiled step, so requests cannot
choose their own. ``--budget-min-agreement A`` calibrates it at start-up on the prompts of
``--budget-calibration FILE`` (one text prompt per line).

SIGTERM / Ctrl-C: new requests are refused, requests in flight finish, then it exits.
Compiled programs are cached under ``~/.cache/moesd_jax/xla`` (``--compile-cache``), so a
restart does not recompile. On CPU, ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0`` in the
environment keeps glibc from returning large buffers to the OS and page-faulting them
back on every step (see DESIGN.md); it is not set automatically.

The same command runs as ``python scripts/serve.py`` from a checkout or ``python -m
moesd_jax.cli.serve``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="target checkpoint or Hugging Face directory "
                   "(default: the bundled target)")
    p.add_argument("--draft", help="draft checkpoint (default: the bundled draft); with "
                   "--spec eagle an EAGLE-3 head directory")
    p.add_argument("--spec", choices=("none", "draft", "ngram", "eagle"), default=None,
                   help="speculation method (default: draft, with --k auto)")
    p.add_argument("--k", default=None,
                   help="draft tokens per step, or 'auto': utility-driven K per request (1, "
                   "2 or 4 drafts, or none where speculation loses; spec/utility.py). "
                   "Default: auto with no --spec, else 4")
    p.add_argument("--auto-costs", choices=("measured", "model"), default="measured",
                   help="with --k auto: iteration costs timed at start-up (default) or the "
                   "cost model")
    p.add_argument("--tree", help="draft tree: a name in configs/spec/ or a YAML path")
    p.add_argument("--mesh", help="device mesh / sharding strategy YAML (configs/mesh/)")
    p.add_argument("--slots", type=int, default=4, help="concurrent sequences (static batch)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="waiting requests beyond the slots; more get 429 (default 64)")
    p.add_argument("--max-len", type=int, default=None,
                   help="per-sequence KV cache capacity: prompt + max_tokens + k + 1 "
                   "(default: the model's max_seq_len)")
    p.add_argument("--prefill-buckets", default=None,
                   help="comma-separated padded prompt lengths compiled at startup "
                   "(default: powers of two from 16 to --max-len)")
    p.add_argument("--served-model-name", default=None, help="model id clients send")
    p.add_argument("--dispatch", default=None, choices=("dense", "gather", "ragged", "pallas"),
                   help="override the MoE dispatch backend")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory override")
    p.add_argument("--compile-cache", default=None,
                   help="persistent XLA cache dir (default ~/.cache/moesd_jax/xla; 'off')")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds to wait for in-flight requests at shutdown (default: all)")
    p.add_argument("--routing-trace", default=None, metavar="FILE.npz",
                   help="record each request's expert routing (its first "
                        "--routing-trace-steps verify steps) into FILE.npz, rewritten as "
                        "requests finish; read it with scripts/analyze_routing.py --traces")
    p.add_argument("--routing-trace-steps", type=int, default=256,
                   help="verify steps recorded per request with --routing-trace")
    p.add_argument("--log-level", default="warning")
    from moesd_jax.cli.budget_args import add_budget_arguments

    add_budget_arguments(p)
    p.add_argument("--budget-calibration", default=None, metavar="FILE",
                   help="with --budget-min-agreement: calibration prompts, one per line")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")

    from moesd_jax.config import ConfigError, SpecConfig
    from moesd_jax.runtime import keep_host_buffers
    from moesd_jax.serving import api, engine

    keep_host_buffers()

    if args.compile_cache != "off":
        engine.enable_compilation_cache(args.compile_cache)
    try:
        k = args.k if args.k is not None else ("auto" if args.spec is None else "4")
        if k != "auto" and not k.lstrip("-").isdigit():
            raise ValueError(f"--k {k!r} must be an integer or 'auto'")
        from moesd_jax.cli.budget_args import budget_from_args

        spec = SpecConfig(method=args.spec or "draft", k=4 if k == "auto" else int(k),
                          tree=args.tree, auto=k == "auto", auto_costs=args.auto_costs,
                          budget=budget_from_args(args))
        spec.validate()
        calib = None
        if spec.budget.min_agreement is not None:
            if not args.budget_calibration:
                raise ValueError("--budget-min-agreement needs --budget-calibration FILE "
                                 "(calibration prompts, one per line)")
            with open(args.budget_calibration) as f:
                calib = [line.rstrip("\n") for line in f if line.strip()]
            if not calib:
                raise ValueError(f"--budget-calibration {args.budget_calibration!r} has no "
                                 "prompts")
        buckets = None
        if args.prefill_buckets:
            buckets = [int(x) for x in args.prefill_buckets.split(",") if x.strip()]
        trace_kw = {}
        if args.routing_trace:
            if args.routing_trace_steps < 1:
                raise ValueError(f"--routing-trace-steps {args.routing_trace_steps} must be "
                                 ">= 1")
            trace_kw = {"routing_trace_steps": args.routing_trace_steps}
        eng, tok, name = engine.load_engine(
            args.model, args.draft, spec, slots=args.slots, max_len=args.max_len,
            max_queue=args.max_queue, prefill_buckets=buckets, mesh=args.mesh,
            dispatch=args.dispatch, tokenizer=args.tokenizer, calibration_prompts=calib,
            **trace_kw)
        if args.routing_trace:
            from moesd_jax.analysis.routing import TraceFile
            from moesd_jax.spec.proposers import model_cfg

            m = model_cfg(*eng.decoder.target).moe
            eng.trace_sink = TraceFile(args.routing_trace, m.num_experts, m.top_k)
    except (ConfigError, ValueError, RuntimeError, OSError) as e:
        from moesd_jax.cli.budget_args import option_names

        print(f"error: {option_names(str(e))}", file=sys.stderr)
        return 2
    name = args.served_model_name or name
    eng.start()

    def ready(url: str) -> None:
        kdesc = f"auto {list(spec.candidates)}" if spec.auto else eng.cfg.k_eff
        b = eng.spec.budget
        bdesc = f" budget={b.policy}:{b.b}" if b.enabled else ""
        print(f"moesd_jax serving {name} at {url} (spec={spec.method} k={kdesc}{bdesc} "
              f"slots={eng.slots} max_len={eng.max_len}; ready in "
              f"{time.perf_counter() - t0:.1f} s)", flush=True)

    drained = api.serve(eng, tok, name, args.host, args.port, log_level=args.log_level,
                        drain_timeout=args.drain_timeout, on_ready=ready)
    print("moesd_jax server stopped" + ("" if drained else " (some requests were cut off)"),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
