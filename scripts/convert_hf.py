"""Convert a local Hugging Face checkpoint into a moesd_jax (orbax) checkpoint.

Usage::

    python scripts/convert_hf.py --hf-dir path/to/hf_model --out ckpt/my_model \
        [--dtype float32|bfloat16]

Supports Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Llama, Qwen2 and Qwen3 (safetensors).
Tokenizer files found in the HF directory are copied into the checkpoint. Prints the
parameter count and the output path; errors are printed on one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moesd_jax.checkpoint import save_checkpoint, tokenizer_files  # noqa: E402
from moesd_jax.models.hf import load_hf_model  # noqa: E402
from moesd_jax.models.transformer import count_params  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-dir", type=Path, required=True, help="local HF model directory")
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="parameter storage dtype (compute stays float32)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.hf_dir.is_dir():
            raise ValueError(f"{args.hf_dir}: no such directory")
        model = load_hf_model(args.hf_dir, dtype=args.dtype)
        tok = args.hf_dir if tokenizer_files(args.hf_dir) else None
        out = save_checkpoint(args.out, model, tokenizer_dir=tok)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = model.cfg
    print(f"model: {cfg.arch}, {cfg.num_layers} layers, d_model {cfg.d_model}"
          + (f", {cfg.moe.num_experts} experts top-{cfg.moe.top_k}" if cfg.moe else ""))
    print(f"parameters: {count_params(model):,} ({args.dtype})")
    print(f"tokenizer: {'copied' if tok else 'none found'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
