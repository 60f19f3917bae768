"""Train a model of the corpus, distil a draft, or evaluate a checkpoint's held-out loss.

Examples::

  # target MoE (40 min budget, cosine schedule sized for --steps)
  python scripts/train.py --model-config moesd-target --out runs/target --steps 3000 \\
      --batch 16 --seq-len 256 --lr 3e-3 --warmup 100 --time-budget-min 40
  # draft distilled from the target's logits
  python scripts/train.py --model-config moesd-draft --out runs/draft \\
      --distill-from runs/target/final --steps 2000
  # held-out loss / perplexity of a checkpoint, as JSON
  python scripts/train.py --eval moesd_jax/bundled/target
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def load_tokens(split: str, cache_dir: Path | None = REPO / "runs" / "token_cache"):
    """The bundled tokenizer's encoding of one corpus split (cached under runs/)."""
    import numpy as np

    from moesd_jax import data

    if cache_dir is not None:
        f = cache_dir / f"{split}-{data.stdlib_path().as_posix().replace('/', '_')}.npy"
        if f.is_file():
            return np.load(f)
    tokens = data.encode_corpus(data.load_tokenizer(), data.read_corpus(split), progress=False)
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(f, tokens)
    return tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", help="configs/models/<NAME>.yaml or a YAML path")
    ap.add_argument("--override", action="append", default=[],
                    help="model config override key.sub=value (repeatable)")
    ap.add_argument("--out", help="run directory (log.jsonl, ckpt/, final/)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01,
                    help="MoE load-balancing loss coefficient")
    ap.add_argument("--distill-from", help="teacher checkpoint: train by KL to its logits")
    ap.add_argument("--distill-alpha", type=float, default=1.0,
                    help="loss = alpha * KL + (1 - alpha) * CE")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/ckpt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget-min", type=float, default=None,
                    help="stop (and export) after this many minutes")
    ap.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                    help="stop (and export) at STEP without changing the --steps schedule; "
                         "--resume continues from there")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--eval", metavar="CKPT", help="print held-out loss/ppl of CKPT as JSON")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--bench", type=int, default=0, metavar="N",
                    help="only time N train steps (after compilation) and print tokens/s")
    ap.add_argument("--dispatch", default="dense",
                    help="MoE dispatch while training: dense (exact) or capacity (sparse)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from moesd_jax.checkpoint import load_model
    from moesd_jax.config import ModelConfig, load_config
    from moesd_jax.data import BUNDLED_TOKENIZER_DIR
    from moesd_jax.train import TrainConfig, count_params, evaluate, train

    if args.eval:
        model, _ = load_model(args.eval)
        res = evaluate(model, load_tokens("heldout"), args.seq_len, args.eval_windows)
        print(json.dumps({"checkpoint": args.eval, **res}))
        return 0
    if not args.model_config:
        raise ValueError("--model-config is required (or --eval CKPT)")
    cfg = load_config(ModelConfig, args.model_config, args.override)
    tc = TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                     warmup=args.warmup, weight_decay=args.weight_decay,
                     aux_coef=args.aux_coef, distill_alpha=args.distill_alpha,
                     seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
                     eval_windows=args.eval_windows, ckpt_every=args.ckpt_every,
                     time_budget_min=args.time_budget_min, stop_at=args.stop_at,
                     dispatch=args.dispatch)
    print(json.dumps({"params": count_params(cfg)}))
    teacher = None
    if args.distill_from:
        teacher, _ = load_model(args.distill_from)
        print(json.dumps({"teacher": args.distill_from, "params": count_params(teacher.cfg)}))
    if args.bench:
        return bench(cfg, tc, teacher, args.bench)
    if not args.out:
        raise ValueError("--out is required for training")
    summary = train(cfg, tc, args.out, load_tokens("train"), load_tokens("heldout"),
                    teacher=teacher, resume=args.resume, tokenizer_dir=BUNDLED_TOKENIZER_DIR,
                    progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def bench(cfg, tc, teacher, n: int) -> int:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from moesd_jax.train import init_training

    _, params, opt_state, tp, step = init_training(cfg, tc, teacher)
    rng = np.random.default_rng(0)
    batch = jnp.asarray(rng.integers(0, cfg.vocab_size, (tc.batch, tc.seq_len + 1)), jnp.int32)
    extra = (tp,) if tp is not None else ()
    t = time.time()
    params, opt_state, m = step(params, opt_state, batch, *extra)
    jax.block_until_ready(m)
    comp = time.time() - t
    t = time.time()
    for _ in range(n):
        params, opt_state, m = step(params, opt_state, batch, *extra)
    jax.block_until_ready(m)
    dt = time.time() - t
    print(json.dumps({"compile_s": round(comp, 1), "step_s": round(dt / n, 3),
                      "tok_s": round(n * tc.batch * tc.seq_len / dt, 1),
                      "loss": float(m["loss"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
