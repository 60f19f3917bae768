"""Decode a JSONL file of prompts in static batches; resumable, multi-host.

Examples:
  moesd-batch-decode --input prompts.jsonl --output out.jsonl            # bundled pair, K=4
  moesd-batch-decode --input p.jsonl --output o.jsonl --model CKPT --spec none --mesh dp
  moesd-batch-decode --merge --output o.jsonl          # join o.jsonl.part-* of a multi-host run

Input lines: {"id", "prompt" or "prompt_ids", "max_tokens", "temperature", "top_p",
"top_k", "seed", "stop"} (the flags below are the defaults of the sampling fields).
Output lines: {"id", "token_ids", "text", "finish_reason", "stats"}, in completion order.
Killed at any point and rerun with the same arguments, the job skips finished ids.
Rejected lines go to the rejects file (and stderr); the exit status is then 1.
Several hosts: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID and run
the same command on each (see README "Batch jobs").

The same command runs as ``python scripts/batch_decode.py`` or ``python -m
moesd_jax.cli.batch_decode``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="JSONL file of requests")
    ap.add_argument("--output", required=True, help="JSONL results (appended to on resume)")
    ap.add_argument("--rejects", default=None,
                    help="rejected lines (default: OUTPUT with .rejects.jsonl as suffix)")
    ap.add_argument("--merge", action="store_true",
                    help="only merge OUTPUT.part-* (and the rejects parts) into OUTPUT")
    ap.add_argument("--model", help="orbax checkpoint or HF directory (default: bundled)")
    ap.add_argument("--draft", help="draft checkpoint or HF dir (default: bundled draft); "
                    "with --spec eagle an EAGLE-3 head directory")
    ap.add_argument("--spec", choices=["none", "draft", "ngram", "eagle"], default=None)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per iteration")
    ap.add_argument("--tree", default=None, help="tree name in configs/spec or a YAML path")
    ap.add_argument("--dispatch", default=None, help="MoE dispatch backend override")
    from moesd_jax.cli.budget_args import add_budget_arguments

    add_budget_arguments(ap, gate=False)
    ap.add_argument("--mesh", default=None,
                    help="sharding strategy (configs/mesh name or YAML path)")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="prompts per static batch (all processes together)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="cache capacity per row (default: the model's max_seq_len bounds "
                         "prompts; the compiled cache is sized from the longest request)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0,
                    help="job seed: a line without 'seed' uses row_seed(SEED, crc32(id))")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return ap


def _check_args(args) -> None:
    if args.merge:
        return
    if not args.input:
        raise ValueError("--input is required (unless --merge)")
    if not Path(args.input).is_file():
        raise ValueError(f"--input {args.input!r} is not a file")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens={args.max_tokens} must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError(f"--temperature={args.temperature} must be >= 0, --top-p="
                         f"{args.top_p} in (0, 1], --top-k={args.top_k} >= 0")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed={args.seed} must be in [0, 2**32)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from moesd_jax.batch.outputs import JobError, merge_parts, rejects_path
    from moesd_jax.config import ConfigError

    rejects = Path(args.rejects) if args.rejects else rejects_path(args.output)
    try:
        _check_args(args)
        if args.merge:
            info = merge_parts(args.output, rejects)
            print(f"merged {info['parts']} parts: {info['lines']} lines -> {args.output}, "
                  f"{info['rejects']} rejects -> {rejects}", file=sys.stderr)
            return 0
        return run(args, rejects)
    except (ValueError, ConfigError, FileNotFoundError, JobError) as e:
        from moesd_jax.cli.budget_args import option_names

        print(f"error: {option_names(str(e))}", file=sys.stderr)
        return 2


def run(args, rejects: Path) -> int:
    from moesd_jax import distributed

    distributed.initialize_distributed()  # no-op without JAX_COORDINATOR_ADDRESS etc.
    import jax
    import numpy as np

    from moesd_jax.batch import Defaults, Limits, ResultWriter, read_requests, run_job
    from moesd_jax.batch.outputs import find_parts, merge_parts, part_path, write_rejects
    from moesd_jax.runtime import keep_host_buffers, load_models
    from moesd_jax.spec.decoder import SpecDecoder

    keep_host_buffers()
    nproc, me = jax.process_count(), jax.process_index()
    from moesd_jax.cli.budget_args import budget_from_args

    lm = load_models(args.model, args.draft, args.spec, k=args.k, tree=args.tree,
                     dispatch=args.dispatch, mesh=args.mesh,
                     spec_budget=budget_from_args(args))
    dec = SpecDecoder(lm.target, lm.draft, lm.spec, max_len=args.max_len, mesh=args.mesh)
    limits = Limits(vocab=dec.cfg.vocab, max_len=dec.cfg.max_len, k_eff=dec.cfg.k_eff)
    defaults = Defaults(args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    requests, bad = read_requests(args.input, defaults, limits, lm.tokenizer, process=me,
                                  num_processes=nproc)
    out_path = Path(args.output) if nproc == 1 else part_path(args.output, me, nproc)
    rej_path = rejects if nproc == 1 else part_path(rejects, me, nproc)
    write_rejects(rej_path, bad)
    for r in bad:
        print(f"error: {args.input} line {r['line']}: {r['error']}", file=sys.stderr)
    writer = ResultWriter(out_path)
    try:
        if writer.dropped_bytes:
            print(f"# {out_path}: dropped a partial last line ({writer.dropped_bytes} bytes) "
                  "from an interrupted run", file=sys.stderr)
        summary = run_job(dec, requests, writer.write, batch_size=args.batch_size,
                          done=writer.done, tokenizer=lm.tokenizer,
                          progress=not args.no_progress)
    finally:
        writer.close()
    n_bad = int(distributed.gather_from_processes(np.asarray([len(bad)], np.int64)).sum())
    summary.update(rejected=len(bad), output=str(out_path), rejects=str(rej_path),
                   process=me, processes=nproc)
    print("# " + json.dumps(summary), file=sys.stderr)
    if nproc > 1:
        distributed.sync("batch_decode_done")
        if distributed.is_primary():
            parts, n = find_parts(args.output)
            if len(parts) == nproc and n == nproc:
                info = merge_parts(args.output, rejects)
                print(f"# merged {nproc} parts: {info['lines']} lines -> {args.output}",
                      file=sys.stderr)
            else:
                print(f"# {len(parts)} of {nproc} parts visible here: copy every host's "
                      f"{args.output}.part-* here, then run with --merge", file=sys.stderr)
        distributed.sync("batch_decode_merged")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
