"""Train an EAGLE-3 head for a frozen target on the stdlib corpus (``moesd_jax/train_eagle.py``).

Examples::

  # a head for the bundled target (resumable: --stop-at STEP, then --resume)
  python scripts/train_eagle.py --target moesd_jax/bundled/target --out runs/eagle \\
      --steps 2000 --batch 8 --seq-len 256 --ttt-steps 4
  # then speculate with it
  python scripts/generate.py --spec eagle --draft runs/eagle/final --k 4 \\
      --prompt 'def fibonacci(n):'
  # the head in the public EAGLE-3 layout (config.json + model.safetensors)
  python scripts/train_eagle.py --export-hf runs/eagle/final --out runs/eagle-hf
  python scripts/train_eagle.py --export-bf16 runs/eagle/final --out moesd_jax/bundled/eagle
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None,
                    help="target checkpoint or HF dir (default: the bundled target)")
    ap.add_argument("--out", help="run directory (log.jsonl, ckpt/, final/)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ttt-steps", type=int, default=4,
                    help="training-time-test unroll (draft depth trained), e.g. 3-7")
    ap.add_argument("--loss-decay", type=float, default=0.8, help="weight of step k: decay**k")
    ap.add_argument("--hidden-layers", default=None,
                    help="3 comma-separated target layers (default: low, middle, high)")
    ap.add_argument("--draft-vocab", type=int, default=None,
                    help="reduced draft vocabulary (the most frequent ids); default: full")
    ap.add_argument("--mlp-dim", type=int, default=None, help="head MLP width (default: "
                    "the target's mlp_dim)")
    ap.add_argument("--target-dispatch", default="capacity2",
                    help="MoE dispatch of the target's forward (features and logits)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/ckpt")
    ap.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                    help="stop (and export) at STEP without changing the --steps schedule")
    ap.add_argument("--time-budget-min", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--export-hf", metavar="HEAD_DIR",
                    help="only write HEAD_DIR's head in the public layout to --out")
    ap.add_argument("--export-bf16", metavar="HEAD_DIR",
                    help="only write HEAD_DIR's head with bfloat16 parameters (native layout) "
                         "to --out: how moesd_jax/bundled/eagle is made")
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
    from moesd_jax.checkpoint import bundled_model_dir, load_model
    from moesd_jax.spec.eagle import EagleConfig
    from moesd_jax.spec.eagle_io import load_eagle, save_eagle_hf
    from moesd_jax.train_eagle import EagleTrainConfig, train_eagle

    if not args.out:
        raise ValueError("--out is required")
    if args.export_hf:
        print(json.dumps({"export": str(save_eagle_hf(args.out, load_eagle(args.export_hf)))}))
        return 0
    if args.export_bf16:
        from moesd_jax.spec.eagle_io import cast_eagle, save_eagle

        head = cast_eagle(load_eagle(args.export_bf16), "bfloat16")
        print(json.dumps({"export": str(save_eagle(args.out, head))}))
        return 0
    from train import load_tokens  # scripts/train.py: the cached corpus encoding

    target_path = args.target or str(bundled_model_dir("target"))
    target, _ = load_model(target_path, param_dtype="float32")
    over = {}
    if args.hidden_layers:
        over["hidden_layers"] = tuple(int(x) for x in args.hidden_layers.split(","))
    if args.draft_vocab:
        over["draft_vocab"] = args.draft_vocab
    if args.mlp_dim:
        over["mlp_dim"] = args.mlp_dim
    cfg = EagleConfig.for_target(target.cfg, param_dtype="float32", compute_dtype="float32",
                                 **over)
    tc = EagleTrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                          lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                          ttt_steps=args.ttt_steps, loss_decay=args.loss_decay,
                          target_dispatch=args.target_dispatch, seed=args.seed,
                          log_every=args.log_every, eval_every=args.eval_every,
                          eval_windows=args.eval_windows, ckpt_every=args.ckpt_every,
                          time_budget_min=args.time_budget_min, stop_at=args.stop_at)
    print(json.dumps({"target": target_path, "hidden_layers": list(cfg.hidden_layers),
                      "draft_vocab": cfg.vd}))
    summary = train_eagle(cfg, tc, target, args.out, load_tokens("train"),
                          load_tokens("heldout"), resume=args.resume,
                          progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
