"""Convert between a local Hugging Face checkpoint and a moesd_jax (orbax) checkpoint.

Usage::

    python scripts/convert_hf.py --hf-dir path/to/hf_model --out ckpt/my_model \
        [--dtype float32|bfloat16]                                   # HF -> orbax
    python scripts/convert_hf.py --to-hf --ckpt ckpt/my_model --out path/to/hf_model \
        [--dtype float32|bfloat16]                                   # orbax -> HF

Reads Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Llama, Qwen2 and Qwen3 (safetensors); writes
the first of these that expresses the model (``moesd_jax.models.hf_export``). Tokenizer
files are copied along. Prints the parameter count and the output path; errors are
printed on one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moesd_jax.checkpoint import (  # noqa: E402
    load_model,
    save_checkpoint,
    tokenizer_dir,
    tokenizer_files,
)
from moesd_jax.models.hf import load_hf_model  # noqa: E402
from moesd_jax.models.hf_export import choose_model_type, export_hf  # noqa: E402
from moesd_jax.models.transformer import count_params  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-dir", type=Path, help="local HF model directory to import")
    ap.add_argument("--to-hf", action="store_true",
                    help="export --ckpt to a HF directory instead of importing --hf-dir")
    ap.add_argument("--ckpt", type=Path, help="moesd_jax checkpoint to export (with --to-hf)")
    ap.add_argument("--out", type=Path, required=True, help="directory to write")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="stored dtype: of our parameters (import; compute stays float32) "
                         "or of the safetensors tensors (export)")
    args = ap.parse_args(argv)
    if args.to_hf and (args.ckpt is None or args.hf_dir is not None):
        ap.error("--to-hf needs --ckpt CKPT_DIR and no --hf-dir")
    if not args.to_hf and (args.hf_dir is None or args.ckpt is not None):
        ap.error("importing needs --hf-dir HF_DIR (--ckpt goes with --to-hf)")
    return args


def _export(args: argparse.Namespace) -> int:
    if not args.ckpt.is_dir():
        raise ValueError(f"{args.ckpt}: no such directory")
    model, _ = load_model(args.ckpt)
    tok = next((d for d in (tokenizer_dir(args.ckpt), args.ckpt)
                if d is not None and tokenizer_files(d)), None)
    out = export_hf(model, args.out, tokenizer_dir=tok, dtype=args.dtype)
    print(f"model: {choose_model_type(model.cfg)}, {model.cfg.num_layers} layers")
    print(f"parameters: {count_params(model):,} ({args.dtype})")
    print(f"tokenizer: {'copied' if tok else 'none found'}")
    print(f"wrote {out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    if not args.hf_dir.is_dir():
        raise ValueError(f"{args.hf_dir}: no such directory")
    model = load_hf_model(args.hf_dir, dtype=args.dtype)
    tok = args.hf_dir if tokenizer_files(args.hf_dir) else None
    out = save_checkpoint(args.out, model, tokenizer_dir=tok)
    cfg = model.cfg
    print(f"model: {cfg.arch}, {cfg.num_layers} layers, d_model {cfg.d_model}"
          + (f", {cfg.moe.num_experts} experts top-{cfg.moe.top_k}" if cfg.moe else ""))
    print(f"parameters: {count_params(model):,} ({args.dtype})")
    print(f"tokenizer: {'copied' if tok else 'none found'}")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _export(args) if args.to_hf else _import(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
