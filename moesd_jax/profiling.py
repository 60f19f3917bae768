"""Where a decode loop's time goes: self time per op scope of one profiled generate call.

The whole decode (prefill + loop) is one jitted program, so Python-side timers see one
number. :func:`profile_generate` runs it once under ``jax.profiler`` (perfetto trace) and
sums, per op scope, the *self* time of every executed XLA thunk (its duration minus the
thunks nested inside it on the same thread: a ``while`` thunk's own cost is its loop
control, not its body). Scopes come from the compiled program's ``op_name`` metadata
(the ``jax.named_scope`` names: ``verify/moe_dispatch``, ``draft/attention``, ...;
``jit``/``while``/``body``/``cond`` wrappers are dropped); a thunk without metadata is
named by its opcode and shape (``?dot f32[1,4096]``), which is how XLA:CPU's matrix-vector
dots appear. This is the table the performance work is steered by (BENCHMARKS.md).

    report = profile_generate(decoder, prompts, max_new_tokens=64)
    print(report.table())

It measures one run on whatever else the host is doing: profile on a quiet machine, and
read it for shares, not as a benchmark (``scripts/bench.py`` is for speed claims). Tracing
adds a few microseconds to every thunk, so regions of many tiny thunks (loop control,
scalar bookkeeping) look larger than they are: confirm a fix with an interleaved A/B
(``benchmarks.time_interleaved``) before believing the profile's size of the gain.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
import time
from collections.abc import Sequence

_WRAPPERS = ("jit(", "while", "body", "cond", "closed_call", "checkpoint", "pjit",
             "branch", "remat")


def op_scope(hlo_line: str, depth: int = 3) -> str | None:
    """The ``op_name`` scope of one HLO instruction line, wrappers dropped, first
    ``depth`` parts (None when the line has no op_name)."""
    m = re.search(r'op_name="([^"]*)"', hlo_line)
    if not m:
        return None
    parts = [p for p in m.group(1).split("/") if p and not p.startswith(_WRAPPERS)]
    return "/".join(parts[:depth]) or "(top)"


def instruction_scopes(hlo_text: str, depth: int = 3) -> dict[str, str]:
    """``{instruction name: scope}`` for every instruction of a compiled HLO module;
    instructions without metadata get ``?opcode shape`` (dots: with their operands)."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if not m:
            continue
        sc = op_scope(line, depth)
        if sc is None:
            shape = re.sub(r"\{.*", "", m.group(2))
            sc = f"?{m.group(3)} {shape}"
        out[m.group(1)] = sc
    return out


def self_times(events: Sequence[dict]) -> list[tuple[dict, float]]:
    """(event, self time in us) for complete ("X") events: duration minus the durations
    of the events directly nested in it on the same thread."""
    by_tid = collections.defaultdict(list)
    for e in events:
        by_tid[e["tid"]].append(e)
    out = []
    for es in by_tid.values():
        es.sort(key=lambda e: (e["ts"], -e["dur"]))
        child = [0.0] * len(es)
        stack: list[int] = []
        for i, e in enumerate(es):
            while stack and es[stack[-1]]["ts"] + es[stack[-1]]["dur"] <= e["ts"] + 1e-6:
                stack.pop()
            if stack:
                child[stack[-1]] += e["dur"]
            stack.append(i)
        out.extend((e, e["dur"] - c) for e, c in zip(es, child))
    return out


@dataclasses.dataclass
class ProfileReport:
    """Self time per scope of one profiled call.

    Attributes:
      wall_s: the call's wall time. new_tokens: tokens generated (all rows).
      iterations: loop iterations (the largest row's). scopes: ``{scope: (self us,
      thunk count)}``.
    """

    wall_s: float
    new_tokens: int
    iterations: int
    scopes: dict[str, tuple[float, int]]

    @property
    def total_us(self) -> float:
        return sum(v[0] for v in self.scopes.values())

    def grouped(self, depth: int) -> dict[str, tuple[float, int]]:
        """The scopes merged to their first ``depth`` parts."""
        out: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
        for sc, (us, n) in self.scopes.items():
            key = sc if sc.startswith("?") else "/".join(sc.split("/")[:depth])
            out[key][0] += us
            out[key][1] += n
        return {k: (v[0], v[1]) for k, v in out.items()}

    def table(self, top: int = 25, depth: int | None = None) -> str:
        scopes = self.grouped(depth) if depth else self.scopes
        tot = self.total_us or 1.0
        it = max(self.iterations, 1)
        lines = [f"wall {self.wall_s * 1e3:.1f} ms for {self.new_tokens} new tokens in "
                 f"{self.iterations} iterations ({self.wall_s * 1e3 / it:.2f} ms/iteration); "
                 f"thunk self time {tot / 1e3:.1f} ms",
                 f"{'ms':>9} {'share':>6} {'us/iter':>8} {'thunks':>7}  scope"]
        for sc, (us, n) in sorted(scopes.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"{us / 1e3:9.2f} {100 * us / tot:5.1f}% {us / it:8.1f} {n:7d}  {sc}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"wall_s": self.wall_s, "new_tokens": self.new_tokens,
                "iterations": self.iterations,
                "scopes": {k: {"self_us": v[0], "thunks": v[1]} for k, v in
                           sorted(self.scopes.items(), key=lambda kv: -kv[1][0])}}


def _trace_events(trace_dir: str) -> list[dict]:
    files = glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no perfetto trace under {trace_dir}")
    ev = json.load(gzip.open(files[0]))
    return ev["traceEvents"] if isinstance(ev, dict) else ev


def profile_generate(decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     depth: int = 3, trace_dir: str | None = None, **kwargs) -> ProfileReport:
    """Profiles one ``decoder.generate_state`` call (compiled and run once before, so the
    profile holds no compilation). ``kwargs`` go to ``prepare_host`` (seed, temperature,
    ...). Single-device decoders only (no mesh)."""
    import jax

    if decoder.plan is not None:
        raise ValueError("profile_generate profiles a single-device decoder (no mesh)")
    prep = decoder.prepare_host(prompts, max_new_tokens, **kwargs)
    cfg = decoder.loop_config([len(p) for p in prompts], [max_new_tokens] * len(prompts))
    jax.block_until_ready(decoder.generate_state(*prep, cfg=cfg))
    extra = decoder._extra_args(cfg, prep, len(prompts))
    hlo = decoder._fn.lower(cfg, decoder.target, decoder.draft, *prep, *extra).compile()
    names = instruction_scopes(hlo.as_text(), depth)
    with tempfile.TemporaryDirectory() as tmp:
        d = trace_dir or tmp
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t0 = time.perf_counter()
            st = jax.block_until_ready(decoder.generate_state(*prep, cfg=cfg))
            wall = time.perf_counter() - t0
        events = [e for e in _trace_events(d) if e.get("ph") == "X"]
    mods = collections.Counter(e.get("args", {}).get("hlo_module", "") for e in events)
    module = next((m for m, _ in mods.most_common() if m.startswith("jit__run")), None)
    if module is None:
        raise RuntimeError("the trace holds no thunk of the decode program (jit__run*)")
    scopes: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e, us in self_times([e for e in events
                             if e.get("args", {}).get("hlo_module") == module]):
        if e["name"].startswith("ThunkExecutor"):
            continue
        sc = names.get(e["name"], "?" + re.sub(r"\.\d+$", "", e["name"]))
        scopes[sc][0] += us
        scopes[sc][1] += 1
    seq = st.seq_len_B.tolist()
    new = int(sum(max(0, s - len(p)) for s, p in zip(seq, prompts)))
    iters = int(max(st.stats.iterations_B.tolist()[:len(prompts)]))
    return ProfileReport(wall, new, iters, {k: (v[0], v[1]) for k, v in scopes.items()})


__all__ = ["ProfileReport", "profile_generate", "instruction_scopes", "op_scope",
           "self_times"]
