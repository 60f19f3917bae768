"""Evaluate the bundled target/draft pair and (optionally) record moesd_jax/bundled/metrics.json.

* held-out loss / perplexity of both models (``--windows`` windows of ``--seq-len``, and
  the fixed small set ``tests/test_bundled.py`` re-checks: 16 windows of 256);
* greedy speculative decoding with the pair (``--k`` draft tokens) on the deterministic
  held-out code prompts (``heldout_prompts(tok, n=50, prompt_tokens=64)``), ``--new``
  tokens each, in batches: mean acceptance length, plus the plain autoregressive greedy
  output of the target for comparison (SD must reproduce it token for token, up to
  float ties);
* ``--sample-prompt TEXT`` (repeatable): print the target's greedy completion of TEXT.

Examples::

  python scripts/eval_bundled.py --write-metrics
  python scripts/eval_bundled.py --skip-spec --sample-prompt 'def fibonacci(n):'
  python scripts/eval_bundled.py --target runs/target/final --draft runs/draft/final
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TEST_SEQ_LEN = 256
TEST_WINDOWS = 16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="target checkpoint (default: bundled)")
    ap.add_argument("--draft", default=None, help="draft checkpoint (default: bundled)")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64, help="held-out eval windows")
    ap.add_argument("--skip-spec", action="store_true")
    ap.add_argument("--skip-loss", action="store_true")
    ap.add_argument("--sample-prompt", action="append", default=[])
    ap.add_argument("--sample-tokens", type=int, default=64)
    ap.add_argument("--write-metrics", action="store_true",
                    help="write moesd_jax/bundled/metrics.json (bundled models only)")
    args = ap.parse_args(argv)
    try:
        return run(args, argv)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args, argv) -> int:
    import numpy as np

    from moesd_jax.checkpoint import bundled_model_dir, load_model
    from moesd_jax.config import SpecConfig
    from moesd_jax.data import heldout_prompts
    from moesd_jax.spec.decoder import SpecDecoder
    from moesd_jax.train import count_params, evaluate

    if args.write_metrics and (args.target or args.draft):
        raise ValueError("--write-metrics records the bundled models only")
    tpath = Path(args.target) if args.target else bundled_model_dir("target")
    dpath = Path(args.draft) if args.draft else bundled_model_dir("draft")
    t0 = time.time()
    target, tok = load_model(tpath)
    draft, dtok = load_model(dpath)
    if tok is None:
        from moesd_jax.data import load_tokenizer

        tok = load_tokenizer()
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"draft vocab {draft.cfg.vocab_size} != target vocab "
                         f"{target.cfg.vocab_size}")
    out: dict = {"target": {"path": str(tpath), "params": count_params(target.cfg)},
                 "draft": {"path": str(dpath), "params": count_params(draft.cfg)}}
    out["draft"]["active_ratio"] = (out["draft"]["params"]["active"]
                                    / out["target"]["params"]["active"])
    print(json.dumps({"params": {k: out[k]["params"] for k in ("target", "draft")},
                      "draft/target active": round(out["draft"]["active_ratio"], 4)}))

    if not args.skip_loss:
        sys.path.insert(0, str(REPO / "scripts"))
        from train import load_tokens

        held = load_tokens("heldout")
        for name, m in (("target", target), ("draft", draft)):
            ev = evaluate(m, held, args.seq_len, args.windows)
            fixed = evaluate(m, held, TEST_SEQ_LEN, TEST_WINDOWS)
            out[name]["heldout"] = ev
            out[name]["heldout_fixed"] = {**fixed, "seq_len": TEST_SEQ_LEN}
            print(json.dumps({name: {"heldout": ev, "heldout_fixed_16x256": fixed}}))

    for text in args.sample_prompt:
        ids = tok.encode(text, add_special_tokens=False)
        ar = SpecDecoder(target, None, SpecConfig(method="none"),
                         max_len=len(ids) + args.sample_tokens + 16)
        res = ar.generate([ids], args.sample_tokens)[0]
        completion = tok.decode(res.token_ids)
        out.setdefault("samples", []).append({"prompt": text, "completion": completion})
        print(f"--- prompt: {text!r}\n{text}{completion}\n---")

    if not args.skip_spec:
        prompts = heldout_prompts(tok, n=args.prompts, prompt_tokens=args.prompt_tokens)
        ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        max_len = max(len(x) for x in ids) + args.new + args.k + 16
        sd = SpecDecoder(target, draft, SpecConfig(method="draft", k=args.k), max_len=max_len)
        ar = SpecDecoder(target, None, SpecConfig(method="none"), max_len=max_len)
        sd_res, ar_res = [], []
        ts = time.time()
        for i in range(0, len(ids), args.batch):
            chunk = ids[i: i + args.batch]
            sd_res += sd.generate(chunk, args.new)
            ar_res += ar.generate(chunk, args.new)
        per = [r.stats["mean_acceptance_length"] for r in sd_res]
        acc = sum(r.stats["accepted"] for r in sd_res)
        its = sum(r.stats["iterations"] for r in sd_res)
        equal = sum(a.token_ids == b.token_ids for a, b in zip(sd_res, ar_res))
        first_div = []
        for a, b in zip(sd_res, ar_res):
            n = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                     None)
            if n is None and len(a.token_ids) != len(b.token_ids):
                n = min(len(a.token_ids), len(b.token_ids))
            first_div.append(n)
        spec = {
            "k": args.k, "prompts": len(ids), "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new, "greedy": True,
            "mean_acceptance_length": float(np.mean(per)),  # mean over prompts
            "pooled_acceptance_length": 1.0 + acc / its if its else 1.0,
            "min_prompt_acceptance_length": float(np.min(per)),
            "sd_equals_ar_prompts": int(equal),
            "first_divergence": [d for d in first_div if d is not None],
            "wall_s": round(time.time() - ts, 1),
        }
        out["spec"] = spec
        print(json.dumps({"spec": spec}))
        print(f"--- held-out prompt 0 SD completion:\n{prompts[0]}"
              f"{tok.decode(sd_res[0].token_ids)}\n---")

    out["wall_s"] = round(time.time() - t0, 1)
    if args.write_metrics:
        out["command"] = "python scripts/eval_bundled.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        for name in ("target", "draft"):
            out[name]["path"] = f"moesd_jax/bundled/{name}"
        f = REPO / "moesd_jax" / "bundled" / "metrics.json"
        f.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
