"""Predicted SD speedup vs batch size from the cost model: MoE vs its dense equivalent.

  python scripts/predict_speedup.py --model mixtral-8x7b --hardware h100
  python scripts/predict_speedup.py --model olmoe-1b-7b --hardware tpu-v5e --k 2 3 4 --json

Writes ``<out-dir>/<stem>.csv`` and ``.png`` (speedup vs batch, one line per K, MoE
solid, dense dashed). ``--json`` prints one JSON list of rows on one line (``batch``,
``k``, ``moe_speedup``, ``dense_speedup``, ``sigma``, target efficiencies, step times).
The model is a config name from ``configs/models`` or a YAML path (``--set key=value``
overrides); the hardware a preset id (``analysis/cost_model.py``; ``cpu-measured``
calibrates this machine first). See docs/cost_model.md for the formulas.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

DEFAULT_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def parse_draft(text: str):
    """``free`` | ``eagle`` | a number in (0, 10]: the draft step over the target's."""
    if text in ("free", "eagle"):
        return None if text == "free" else "eagle"
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--draft={text!r}: use free, eagle or a ratio such "
                                         "as 0.143") from None
    if not 0.0 <= r <= 10.0:
        raise argparse.ArgumentTypeError(f"--draft={text!r}: a ratio must be in [0, 10]")
    return r


def write_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, k in enumerate(sorted({r["k"] for r in rows})):
        pts = sorted((r["batch"], r["moe_speedup"], r["dense_speedup"]) for r in rows
                     if r["k"] == k)
        b, mo, de = zip(*pts)
        ax.plot(b, mo, "-o", color=f"C{i}", ms=3, label=f"MoE K={k}")
        ax.plot(b, de, "--s", color=f"C{i}", ms=3, label=f"dense K={k}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("predicted SD speedup over AR")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="configs/models name or YAML path")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. moe.top_k=4")
    ap.add_argument("--hardware", default="h100", help="preset id, e.g. h100, tpu-v5e")
    ap.add_argument("--batch", type=int, nargs="+", default=DEFAULT_BATCHES)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--acceptance", type=float, nargs="+", default=[0.8],
                    help="per-position acceptance rate (one value), or one per position")
    ap.add_argument("--draft", type=parse_draft, default="0.143",
                    help="draft step cost: a ratio of the target's T=1 step (default 0.143, "
                    "Cohere's measurement), 'eagle' (a one-layer head costed on the "
                    "hardware) or 'free'")
    ap.add_argument("--context", type=int, default=512, help="cached tokens per row")
    ap.add_argument("--out-dir", default="docs")
    ap.add_argument("--stem", default=None, help="file name stem (default predict_MODEL_HW)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from moesd_jax.analysis import cost_model
    from moesd_jax.config import ConfigError, ModelConfig, load_config

    try:
        cfg = load_config(ModelConfig, args.model, args.set)
        if min(args.batch) < 1 or min(args.k) < 1 or args.context < 0:
            raise ValueError(f"--batch {args.batch} and --k {args.k} must be >= 1, "
                             f"--context={args.context} >= 0")
        acc = args.acceptance[0] if len(args.acceptance) == 1 else args.acceptance
        hw = cost_model.preset(args.hardware)
        rows = cost_model.speedup_curve(cfg, hw, args.batch, args.k, acc, args.draft,
                                        args.context)
    except (ValueError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stem = args.stem or f"predict_{Path(args.model).stem}_{hw.name}"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    title = (f"{Path(args.model).stem} on {hw.name}: acceptance {args.acceptance}, draft "
             f"{args.draft if args.draft is not None else 'free'}, context {args.context}")
    write_plot(rows, out / f"{stem}.png", title)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"# {title}; wrote {out / stem}.csv and .png")
    print(f"{'batch':>6} {'K':>2} {'MoE':>6} {'dense':>6} {'sigma':>5} {'MoE eff':>7} "
          f"{'dense eff':>9} {'MoE uniq':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['k']:>2} {r['moe_speedup']:>6.2f} {r['dense_speedup']:>6.2f} "
              f"{r['sigma']:>5.2f} {r['moe_target_efficiency']:>7.2f} "
              f"{r['dense_target_efficiency']:>9.2f} {r['moe_unique_experts_verify']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
