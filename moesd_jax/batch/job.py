"""The batch-decoding loop: static batches through one compiled program.

:func:`run_job` decodes a process's pending requests (``inputs.Request``) in static
batches of ``rows`` prompts with :class:`~moesd_jax.spec.decoder.SpecDecoder` and hands
each finished batch's result lines to a writer (``outputs.ResultWriter``).

One program for the whole job: :func:`job_shape` fixes the padded prompt length (one
prefill bucket holding the longest prompt) and the loop config (cache capacity from the
longest prompt + max_tokens) from *every* valid request of every process, finished or
not, and every batch has exactly ``rows`` rows (the last one padded with inert rows,
``decoder.pad_rows``). So the job compiles once, and a restarted job runs the same
program as the run it resumes. Requests are sorted by (max_tokens, prompt length),
longest first, so the rows of a batch finish at about the same step. Batches are
pipelined: the next batch is dispatched before the previous one's tokens are read back
and written, so host work overlaps device work; nothing runs in Python per token.

Multi-process (``jax.distributed``) with a mesh: every process runs every batch
collectively. Batch j is the concatenation, in process order, of each process's j-th
``rows`` requests (inert rows where a process has run out), gathered to every process
(:func:`~moesd_jax.distributed.gather_from_processes`); each process writes only its own
rows. Without a mesh each process decodes its share alone on its own devices.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from moesd_jax import distributed
from moesd_jax.batch.inputs import Request
from moesd_jax.spec.decoder import SpecDecoder, pad_rows
from moesd_jax.spec.loop import LoopConfig


@dataclasses.dataclass(frozen=True)
class JobShape:
    """The static shapes of a job's one compiled program.

    Attributes:
      prompt_len: padded prompt length (the one prefill bucket).
      loop: the loop config (cache capacity) every batch runs with.
      rows: rows this process contributes per batch.
      collective: batches run across all processes (a mesh spanning them).
    """

    prompt_len: int
    loop: LoopConfig
    rows: int
    collective: bool


def job_shape(decoder: SpecDecoder, requests: Sequence[Request], batch_size: int) -> JobShape:
    """The job's shapes from every process's valid requests (collective: every process
    calls it). ``batch_size`` is the global number of rows per batch: each of P processes
    contributes ceil(batch_size / P)."""
    longest = max((len(r.prompt_ids) for r in requests), default=1)
    total = max((len(r.prompt_ids) + r.max_tokens for r in requests), default=2)
    longest, total = (int(x) for x in distributed.gather_from_processes(
        np.asarray([longest, total], np.int64)).max(axis=0))
    bucket = decoder.prompt_bucket
    p_len = min(-(-longest // bucket) * bucket, decoder.cfg.max_len)
    loop = decoder.loop_config([longest, 1], [1, total - 1])
    n = jax.process_count()
    collective = decoder.plan is not None and n > 1
    return JobShape(p_len, loop, -(-batch_size // n) if n > 1 else batch_size, collective)


def host_batch(decoder: SpecDecoder, reqs: Sequence[Request], shape: JobShape) -> tuple:
    """``prefill`` arguments (numpy) for ``reqs``, padded to ``shape.rows`` inert rows."""
    if reqs:
        args = decoder.prepare_host(
            [list(r.prompt_ids) for r in reqs], [r.max_tokens for r in reqs],
            temperature=[r.temperature for r in reqs], top_k=[r.top_k for r in reqs],
            top_p=[r.top_p for r in reqs], seed=[r.seed for r in reqs],
            buckets=[shape.prompt_len])
    else:  # this process has run out: an all-inert batch (collective mode)
        i32, f32 = np.int32, np.float32
        z = lambda dt, *s: np.zeros((0, *s), dt)  # noqa: E731
        args = (z(i32, shape.prompt_len), z(i32), z(i32), z(f32), z(i32), z(f32), z(i32),
                z(i32, decoder.cfg.max_stop))
    return pad_rows(args, shape.rows)


def _cut_at_stop(tokenizer, ids: list[int], stops: Sequence[str]) -> tuple[list[int], str, bool]:
    """(tokens up to the one completing the first stop string, text before it, stopped)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    if not hits:
        return ids, text, False
    lo, hi = 1, len(ids)  # the shortest prefix whose text holds a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        t = tokenizer.decode(ids[:mid], skip_special_tokens=True)
        if any(s in t for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return ids[:lo], text[:min(hits)], True


def result_line(req: Request, new_ids: list[int], stats: dict, tokenizer,
                eos: Sequence[int]) -> dict:
    """The output object of one request: id, token_ids, text, finish_reason, stats."""
    text, stopped = None, False
    if tokenizer is not None:
        new_ids, text, stopped = (_cut_at_stop(tokenizer, new_ids, req.stops) if req.stops
                                  else (new_ids, tokenizer.decode(
                                      new_ids, skip_special_tokens=True), False))
    reason = "stop" if stopped or (new_ids and new_ids[-1] in eos) else "length"
    return {"id": req.id, "token_ids": new_ids, "text": text, "finish_reason": reason,
            "stats": stats}


def _row_stats(st: dict, i: int, k: int) -> dict:
    it, acc = int(st["iterations"][i]), int(st["accepted"][i])
    return {"iterations": it, "drafted": int(st["drafted"][i]), "accepted": acc,
            "accepted_per_position": [int(x) for x in st["accepted_pos"][i][:k]],
            "draft_fed": int(st["draft_fed"][i]),
            "mean_acceptance_length": (1.0 + acc / it) if it else 1.0}


def _read_back(state) -> dict:
    """The few arrays results need (never the caches), as numpy on every process."""
    s = state.stats
    return distributed.process_allgather({
        "tokens": state.tokens_BM, "seq_len": state.seq_len_B, "prompt_len": state.prompt_len_B,
        "iterations": s.iterations_B, "drafted": s.drafted_B, "accepted": s.accepted_B,
        "accepted_pos": s.accepted_pos_BK, "draft_fed": s.draft_fed_B})


def run_job(decoder: SpecDecoder, requests: Sequence[Request], write: Callable[[list], None],
            *, batch_size: int, done: set[str] = frozenset(), tokenizer=None,
            progress: bool = True) -> dict:
    """Decodes this process's requests not in ``done`` and writes their result lines.

    Args:
      decoder: the decoder (its mesh, if any, decides collective mode).
      requests: this process's valid requests (all of them: the job's shapes come from
        every request, finished or not).
      write: called with each finished batch's result dicts (``ResultWriter.write``).
      batch_size: global rows per batch.
      done: canonical ids already written (skipped).
      tokenizer: for ``text`` and stop strings (None: ``text`` is null).
      progress: a tqdm bar on process 0 (tokens/s and mean acceptance length).

    Returns:
      this process's summary: written, skipped, tokens, seconds (first dispatch to last
      write), tokens_per_s, mean_acceptance_length (pooled: 1 + accepted / iterations),
      batches.
    """
    shape = job_shape(decoder, requests, batch_size)
    pending = [r for r in requests if r.key not in done]
    pending.sort(key=lambda r: (-r.max_tokens, -len(r.prompt_ids), r.line))
    rows, nproc, me = shape.rows, jax.process_count(), jax.process_index()
    counts = distributed.gather_from_processes(np.asarray([len(pending)], np.int64))[:, 0]
    if shape.collective:
        n_batches = -(-int(counts.max()) // rows)
        shown_total = int(counts.sum())
    else:
        n_batches = -(-len(pending) // rows)
        shown_total = len(pending)
    bar = None
    if progress and distributed.is_primary() and shown_total:
        from tqdm import tqdm

        bar = tqdm(total=shown_total, unit="prompt", dynamic_ncols=True,
                   desc="batch decode" + (f" ({nproc} processes)" if shape.collective else ""))
    k = decoder.cfg.accept_positions
    eos = decoder.eos_token_ids
    totals = dict.fromkeys(("tokens", "accepted", "iterations", "shown_tokens",
                            "shown_accepted", "shown_iterations"), 0)
    t0 = time.perf_counter()

    def dispatch(j: int):
        mine = pending[j * rows:(j + 1) * rows]
        args = host_batch(decoder, mine, shape)
        offset = 0
        if shape.collective:  # every process's rows, in process order, on every process
            g = distributed.gather_from_processes(args)
            args = tuple(a.reshape((-1,) + a.shape[2:]) for a in g)
            offset = me * rows
        return mine, offset, decoder.generate_state(*args, cfg=shape.loop)

    def finish(mine, offset, state):
        out = _read_back(state)
        lines = []
        for i, req in enumerate(mine):
            g = offset + i
            p, n = int(out["prompt_len"][g]), int(out["seq_len"][g])
            lines.append(result_line(req, out["tokens"][g, p:n].tolist(),
                                     _row_stats(out, g, k), tokenizer, eos))
        write(lines)
        new_B = out["seq_len"] - out["prompt_len"]
        mine_B = np.zeros(new_B.shape, bool)
        mine_B[offset:offset + len(mine)] = True
        # the bar shows every process's rows in collective mode (process 0 sees them all)
        shown_B = (out["prompt_len"] > 0) if shape.collective else mine_B
        for name, sel in (("", mine_B), ("shown_", shown_B)):
            totals[name + "tokens"] += int(np.sum(new_B[sel]))
            totals[name + "accepted"] += int(np.sum(out["accepted"][sel]))
            totals[name + "iterations"] += int(np.sum(out["iterations"][sel]))
        if bar is not None:
            dt = max(time.perf_counter() - t0, 1e-9)
            acc = 1 + totals["shown_accepted"] / max(totals["shown_iterations"], 1)
            bar.update(int(np.sum(shown_B)))
            bar.set_postfix(tok_s=f"{totals['shown_tokens'] / dt:.1f}", acc_len=f"{acc:.2f}")

    inflight = None
    for j in range(n_batches):
        nxt = dispatch(j)  # queued behind the batch in flight
        if inflight is not None:
            finish(*inflight)
        inflight = nxt
    if inflight is not None:
        finish(*inflight)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    it = totals["iterations"]
    return {"written": len(pending), "skipped": len(requests) - len(pending),
            "tokens": totals["tokens"], "seconds": seconds,
            "tokens_per_s": totals["tokens"] / seconds if seconds > 0 and pending else 0.0,
            "mean_acceptance_length": 1 + totals["accepted"] / it if it else 1.0,
            "batches": n_batches}
