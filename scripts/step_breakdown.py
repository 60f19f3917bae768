#!/usr/bin/env python
"""Per-step cost breakdown of the bundled pair: one AR step, one chain-4 iteration (draft
model), one ngram-4 iteration (prompt lookup) and one eagle-4 iteration (an EAGLE-3 head,
random weights: its cost does not depend on them) at batch 1 and 10, plus the sampling
filter over the verified rows, each a jitted function timed from the same decode state
(median of 20 after warm-up) on held-out prompts of 64 tokens.

It uses only interfaces that older commits also have, so the same file measures a
baseline: ``git worktree add /tmp/base REV && PYTHONPATH=/tmp/base python
scripts/step_breakdown.py``.

    python scripts/step_breakdown.py [--batch 1 10] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if min(args.batch) < 1 or max(args.batch) > 50:
        print(f"error: --batch {args.batch} must be in [1, 50]", file=sys.stderr)
        return 2
    try:  # older commits lack it; it changes allocation, not results
        from moesd_jax.runtime import keep_host_buffers

        keep_host_buffers()
    except ImportError:
        pass
    import jax
    import jax.numpy as jnp

    from moesd_jax.benchmarks import median_time
    from moesd_jax.config import SpecConfig
    from moesd_jax.data import heldout_prompts
    from moesd_jax.runtime import load_models
    from moesd_jax.spec import loop
    from moesd_jax.spec.decoder import SpecDecoder
    from moesd_jax.spec.sampling import filter_probs

    lm = load_models(None, None, "draft")
    texts = heldout_prompts(lm.tokenizer, n=max(args.batch), prompt_tokens=64)
    prompts = [lm.tokenizer.encode(t) for t in texts]
    try:  # the cost of a head does not depend on its weights: a random one
        from flax import nnx

        from moesd_jax.spec.eagle import EagleConfig, EagleHead

        head = EagleHead(EagleConfig.for_target(lm.target.cfg, param_dtype="float32"),
                         nnx.Rngs(0))
    except ImportError:
        head = None
    rows = []
    for b in args.batch:
        ps = prompts[:b]
        for name, spec in (("AR step", SpecConfig(method="none")),
                           ("chain-4 iteration", SpecConfig(method="draft", k=4)),
                           ("ngram-4 iteration", SpecConfig(method="ngram", k=4)),
                           ("eagle-4 iteration", SpecConfig(method="eagle", k=4))):
            if spec.method == "eagle" and head is None:
                continue  # an older commit without the EAGLE head
            draft = {"draft": lm.draft, "eagle": head}.get(spec.method)
            dec = SpecDecoder(lm.target, draft, spec)
            prep = dec.prepare(ps, 64)
            cfg = (dec.loop_config([len(p) for p in ps], [64]) if hasattr(dec, "loop_config")
                   else dec.cfg)
            pre = jax.jit(lambda t, d, *a, cfg=cfg: loop.prefill(cfg, t, d, *a))
            state = jax.block_until_ready(pre(dec.target, dec.draft, *prep))
            step = jax.jit(lambda t, d, s, cfg=cfg: loop.step(cfg, t, d, s))
            args_ = (dec.target, dec.draft, state)
            ms = median_time(functools.partial(step, *args_), repeats=20) * 1e3
            rows.append({"batch": b, "what": name, "cache_slots": cfg.max_len, "ms": ms})
        logits = jax.random.normal(jax.random.PRNGKey(0), (b * 5, lm.target.cfg.vocab_size))
        z = jnp.zeros((b * 5,))
        fp = jax.jit(filter_probs)
        ms = median_time(functools.partial(fp, logits, z, z.astype(jnp.int32), z + 1),
                         repeats=20) * 1e3
        rows.append({"batch": b, "what": f"greedy filter_probs, {b * 5} rows", "cache_slots": 0,
                     "ms": ms})
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        slots = f"(cache {r['cache_slots']})" if r["cache_slots"] else ""
        print(f"B={r['batch']:<3} {r['what']:<34} {slots:<12} {r['ms']:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
