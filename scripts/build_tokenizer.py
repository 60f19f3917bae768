"""Train the bundled byte-level BPE tokenizer on the train split of the stdlib corpus.

Usage::

    python scripts/build_tokenizer.py --out moesd_jax/bundled/tokenizer --vocab-size 4096

Prints corpus statistics and the tokenizer's compression (UTF-8 bytes per token) on the
train and held-out splits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moesd_jax.data import (  # noqa: E402
    corpus_files,
    encode_corpus,
    read_corpus,
    stdlib_path,
    train_tokenizer,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The parsed namespace.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("moesd_jax/bundled/tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--stdlib-dir", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train, save and report on the tokenizer.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit code.
    """
    args = parse_args(argv)
    root = stdlib_path(args.stdlib_dir)
    print(f"stdlib: {root}  (Python {sys.version.split()[0]})")
    texts = {s: read_corpus(s, root) for s in ("train", "heldout")}
    for split, docs in texts.items():
        n_bytes = sum(len(t.encode("utf-8")) for t in docs)
        print(f"{split:8s}: {len(corpus_files(split, root)):4d} files, {n_bytes:,} bytes")
    t0 = time.perf_counter()
    tok = train_tokenizer(texts["train"], vocab_size=args.vocab_size, out_dir=args.out)
    print(f"trained vocab={len(tok)} in {time.perf_counter() - t0:.1f}s -> {args.out}")
    for split, docs in texts.items():
        ids = encode_corpus(tok, docs, progress=False)
        n_bytes = sum(len(t.encode("utf-8")) for t in docs)
        n_eos = len(docs)
        print(
            f"{split:8s}: {ids.size:,} tokens (incl. {n_eos} EOS), "
            f"{n_bytes / (ids.size - n_eos):.3f} bytes/token"
        )
    for f in sorted(args.out.iterdir()):
        print(f"  {f.name}: {f.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
