"""Routing-trace analysis: unique experts per verification step, the independence
baseline, temporal correlation (Cohere), and the Amdahl split of a step.

A **trace** is one request's routing: an int array ``[S, T, L, K]``, for each of its S
verify steps (plain decoding: T = 1) the K expert ids each of the step's T tokens was
routed to in each of the L MoE layers; id E (= num_experts) means no expert (a padded
or budget-dropped assignment) and is ignored. vLLM's ``routed_experts`` (``[gen_len,
layers, top_k]``) is the T = 1 case. Traces come from :func:`record_traces` (the decode
loop records them when ``LoopConfig.trace_steps > 0``), from ``scripts/generate.py
--routing-trace FILE``, or from any ``.npz`` of such arrays (:func:`load_traces`).

Measures, all per MoE layer and then averaged over layers:
  unique      distinct experts one verify step loads (what it must read)
  baseline    the same, after the request's token rows are shuffled in time (each layer
              independently): identical marginal expert frequencies, no temporal
              correlation; ``reduction = 1 - unique / baseline`` is the saving that
              temporal correlation gives (Cohere: 20-31%)
  global      the same with token rows shuffled across *all* requests (the corpus's
              expert frequencies: also removes each request's own topical preferences)
  formula     ``N (1 - (1 - k/N)^T)``: independence with *uniform* expert frequencies
  overlap     the fraction of a step's experts that the previous step also loaded
Confidence intervals are over requests (mean +- 1.96 standard errors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moesd_jax.analysis.cost_model import expected_unique_experts


def _check(trace: np.ndarray) -> np.ndarray:
    trace = np.asarray(trace)
    if trace.ndim != 4:
        raise ValueError(f"a routing trace is [steps, tokens, layers, top_k]; got shape "
                         f"{trace.shape}")
    return trace


def unique_per_step(trace: np.ndarray, num_experts: int) -> np.ndarray:
    """Distinct experts each step routed to, per layer: float [S, L]."""
    trace = _check(trace)
    s, t, layers, k = trace.shape
    onehot = np.zeros((s, layers, num_experts + 1), bool)
    ids = np.transpose(trace, (0, 2, 1, 3)).reshape(s, layers, t * k).astype(np.int64)
    np.put_along_axis(onehot, np.minimum(ids, num_experts), True, axis=2)
    return onehot[:, :, :num_experts].sum(-1).astype(np.float64)


def shuffled(trace: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The independence baseline's trace: the request's S*T token rows permuted in time,
    each layer with its own permutation (same marginals, no temporal correlation)."""
    trace = _check(trace)
    s, t, layers, k = trace.shape
    flat = trace.reshape(s * t, layers, k).copy()
    for layer in range(layers):
        flat[:, layer] = flat[rng.permutation(s * t), layer]
    return flat.reshape(s, t, layers, k)


def shuffled_global(traces: Sequence[np.ndarray], rng: np.random.Generator) -> list:
    """Every request's token rows pooled, permuted (each layer on its own) and dealt back
    into the requests' shapes: the corpus-level independence baseline."""
    rows = [t.reshape(-1, *t.shape[2:]) for t in traces]
    pool = np.concatenate(rows).copy()
    for layer in range(pool.shape[1]):
        pool[:, layer] = pool[rng.permutation(len(pool)), layer]
    out, i = [], 0
    for t, r in zip(traces, rows):
        out.append(pool[i:i + len(r)].reshape(t.shape))
        i += len(r)
    return out


def baseline_unique(trace: np.ndarray, num_experts: int, rng: np.random.Generator,
                    shuffles: int = 8) -> np.ndarray:
    """Mean over ``shuffles`` time shuffles of :func:`unique_per_step`: float [S, L]."""
    return np.mean([unique_per_step(shuffled(trace, rng), num_experts)
                    for _ in range(shuffles)], axis=0)


def step_overlap(trace: np.ndarray, num_experts: int) -> float:
    """Mean over consecutive step pairs and layers of |E_s & E_{s-1}| / |E_s|: how much of
    a step's expert set the previous step had loaded (NaN with fewer than 2 steps)."""
    trace = _check(trace)
    s, t, layers, k = trace.shape
    if s < 2:
        return float("nan")
    sets = np.zeros((s, layers, num_experts + 1), bool)
    ids = np.transpose(trace, (0, 2, 1, 3)).reshape(s, layers, t * k).astype(np.int64)
    np.put_along_axis(sets, np.minimum(ids, num_experts), True, axis=2)
    sets = sets[:, :, :num_experts]
    inter = (sets[1:] & sets[:-1]).sum(-1)
    size = sets[1:].sum(-1)
    ok = size > 0
    return float(np.mean(inter[ok] / size[ok])) if ok.any() else float("nan")


def tokens_trace(trace: np.ndarray) -> np.ndarray:
    """A T = 1 trace (plain decoding) as token rows ``[S, L, K]``."""
    trace = _check(trace)
    if trace.shape[1] != 1:
        raise ValueError(f"tokens_trace needs a plain-decoding trace (T = 1); got T = "
                         f"{trace.shape[1]}")
    return trace[:, 0]


def windows(token_rows: np.ndarray, t: int) -> np.ndarray:
    """Consecutive, non-overlapping windows of ``t`` tokens as a trace ``[S//t, t, L, K]``
    (what a verification of t consecutive tokens of this text routes)."""
    n = token_rows.shape[0] // t
    return token_rows[: n * t].reshape(n, t, *token_rows.shape[1:])


def _ci(values: Sequence[float]) -> tuple[float, float, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    half = 1.96 * float(v.std(ddof=1)) / np.sqrt(v.size) if v.size > 1 else float("nan")
    return m, m - half, m + half


@dataclasses.dataclass
class RoutingReport:
    num_experts: int
    top_k: int
    requests: int
    steps: int
    tokens_per_step: float
    unique: float  # mean distinct experts per layer per verify step
    baseline: float  # the same under the time-shuffled independence baseline
    baseline_global: float  # ... with rows shuffled across all requests
    formula: float  # N(1-(1-k/N)^T) at the mean T
    reduction: float  # 1 - unique / baseline, pooled over requests
    reduction_ci: tuple[float, float, float]  # mean over requests, 95% CI
    reduction_global: float  # 1 - unique / baseline_global
    reduction_global_ci: tuple[float, float, float]
    overlap: float  # step-to-step expert overlap
    unique_per_layer: list[float]
    baseline_per_layer: list[float]
    by_window: list[dict] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def analyze(traces: Sequence[np.ndarray], num_experts: int, top_k: int, seed: int = 0,
            shuffles: int = 8) -> RoutingReport:
    """The report over requests' traces (each ``[S, T, L, K]``; T may differ between
    requests, e.g. a chain's K + 1 or a tree's N + 1)."""
    traces = [_check(t) for t in traces if np.asarray(t).shape[0] > 0]
    if not traces:
        raise ValueError("no routing traces with at least one step")
    rng = np.random.default_rng(seed)
    uniq, base, per_req, overl = [], [], [], []
    for tr in traces:
        u = unique_per_step(tr, num_experts)
        b = baseline_unique(tr, num_experts, rng, shuffles)
        uniq.append(u)
        base.append(b)
        per_req.append(1.0 - u.mean() / b.mean())
        overl.append(step_overlap(tr, num_experts))
    u_all, b_all = np.concatenate(uniq), np.concatenate(base)
    g_req = [[] for _ in traces]  # per request: its rows after corpus-wide shuffles
    for _ in range(shuffles):
        for i, t in enumerate(shuffled_global(traces, rng)):
            g_req[i].append(unique_per_step(t, num_experts))
    g_req = [np.concatenate(g) for g in g_req]
    g_all = np.concatenate(g_req)
    per_req_g = [1.0 - u.mean() / g.mean() for u, g in zip(uniq, g_req)]
    t_mean = float(np.mean([tr.shape[1] for tr in traces for _ in range(tr.shape[0])]))
    return RoutingReport(
        num_experts=num_experts, top_k=top_k, requests=len(traces), steps=len(u_all),
        tokens_per_step=t_mean, unique=float(u_all.mean()), baseline=float(b_all.mean()),
        baseline_global=float(g_all.mean()),
        reduction_global=float(1.0 - u_all.mean() / g_all.mean()),
        reduction_global_ci=_ci(per_req_g),
        formula=expected_unique_experts(num_experts, top_k, t_mean),
        reduction=float(1.0 - u_all.mean() / b_all.mean()), reduction_ci=_ci(per_req),
        overlap=float(np.nanmean(overl)) if np.isfinite(overl).any() else float("nan"),
        unique_per_layer=u_all.mean(0).tolist(), baseline_per_layer=b_all.mean(0).tolist())


def unique_vs_tokens(token_traces: Sequence[np.ndarray], num_experts: int, top_k: int,
                     ts: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8), seed: int = 0,
                     shuffles: int = 8) -> list[dict]:
    """Unique experts for T consecutive tokens (windows of plain-decoding traces, [S, L, K]
    each) vs the time-shuffled baseline and the formula, per T: what a T-token
    verification of this text loads, with and without temporal correlation."""
    rows = []
    for t in ts:
        ws = [windows(tr, t) for tr in token_traces]
        ws = [w for w in ws if w.shape[0] > 0]
        if not ws:
            break
        rep = analyze(ws, num_experts, top_k, seed, shuffles)
        rows.append({"tokens": int(t), "unique": rep.unique, "baseline": rep.baseline,
                     "baseline_global": rep.baseline_global, "formula": rep.formula,
                     "reduction": rep.reduction, "reduction_global": rep.reduction_global,
                     "reduction_global_ci": list(rep.reduction_global_ci),
                     "reduction_ci": list(rep.reduction_ci), "requests": rep.requests})
    return rows


def amdahl(cfg, hw, batch: int, tokens: int, unique_experts: float | None = None,
           context: int = 512) -> dict:
    """Step time split into routed-expert and non-expert parts (``cost_model``): the
    expert fraction f bounds what expert-side savings (budgets, fewer unique experts) can
    give, 1 / (1 - f); the non-expert part (attention, dense, head, overheads) is paid
    once per verify step and so amortised over its accepted tokens."""
    from moesd_jax.analysis.cost_model import step_cost

    c = step_cost(cfg, hw, batch, tokens, context=context, unique_experts=unique_experts)
    f = c.expert_fraction
    return {"step_ms": c.time_s * 1e3, "expert_ms": c.expert_time_s * 1e3,
            "non_expert_ms": (c.time_s - c.expert_time_s) * 1e3, "expert_fraction": f,
            "max_speedup_from_experts": 1.0 / (1.0 - f) if f < 1 else float("inf"),
            "parts_ms": {k: p.time_s * 1e3 for k, p in c.parts.items()}
            | {"overhead": c.overhead_s * 1e3}}


# -- recording and files ----------------------------------------------------------------------
def record_traces(decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  **kwargs) -> tuple[list[np.ndarray], list]:
    """Runs ``decoder`` (a ``SpecDecoder``) on ``prompts`` with routing recorded (keyword
    arguments as ``SpecDecoder.generate``); returns (per request ``[S, T, L, K]`` traces,
    per request ``GenerationResult``)."""
    import dataclasses as dc

    import jax

    from moesd_jax.spec.decoder import GenerationResult, row_stats

    prepared = decoder.prepare(prompts, max_new_tokens, **kwargs)
    cfg = decoder.loop_config([len(p) for p in prompts], [max_new_tokens] * len(prompts))
    cfg = dc.replace(cfg, trace_steps=int(max_new_tokens))
    state = jax.block_until_ready(decoder.generate_state(*prepared, cfg=cfg))
    if state.routing_trace is None:
        raise ValueError("the target has no MoE layers: nothing to trace")
    trace = np.asarray(state.routing_trace)  # [S, B, T, L, K]
    iters = np.asarray(state.stats.iterations_B)
    tokens = np.asarray(state.tokens_BM)
    seq = np.asarray(state.seq_len_B)
    traces = [trace[: iters[i], i] for i in range(len(prompts))]
    results = [GenerationResult(tokens[i, len(p): seq[i]].tolist(),
                                row_stats(state, i, cfg.accept_positions))
               for i, p in enumerate(prompts)]
    return traces, results


def save_traces(path: str | Path, traces: Sequence[np.ndarray], num_experts: int,
                top_k: int, request_ids: Sequence[str] | None = None) -> None:
    """``.npz`` with ``trace_0 .. trace_{n-1}`` ([S, T, L, K] int16), the routing shape
    (``num_experts``, ``top_k``) and, when given, the ``request_ids``. Written to a
    temporary file and renamed, so a reader never sees a half-written file."""
    path = Path(path)
    extra = {} if request_ids is None else {"request_ids": np.asarray(list(request_ids))}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, num_experts=num_experts, top_k=top_k, **extra,
                        **{f"trace_{i}": np.asarray(t, np.int16) for i, t in enumerate(traces)})
    tmp.replace(path)


class TraceFile:
    """A server's routing-trace sink (``serve.py --routing-trace FILE``): each finished
    request's trace is added and the file rewritten (:func:`save_traces` format, readable
    by ``analyze_routing.py --traces`` while the server runs)."""

    def __init__(self, path: str | Path, num_experts: int, top_k: int):
        self.path, self.num_experts, self.top_k = Path(path), num_experts, top_k
        self.ids: list[str] = []
        self.traces: list[np.ndarray] = []

    def __call__(self, request_id: str, trace: np.ndarray) -> None:
        if len(trace) == 0:  # finished before its first verify step
            return
        self.ids.append(request_id)
        self.traces.append(np.asarray(trace, np.int16))
        save_traces(self.path, self.traces, self.num_experts, self.top_k, self.ids)


def load_traces(path: str | Path) -> tuple[list[np.ndarray], int, int]:
    """(traces, num_experts, top_k) from :func:`save_traces`' file."""
    with np.load(path) as z:
        if "num_experts" not in z.files or "top_k" not in z.files:
            raise ValueError(f"{path}: not a routing-trace file (no num_experts / top_k; "
                             "write one with generate.py --routing-trace)")
        n = sum(1 for k in z.files if k.startswith("trace_"))
        return ([z[f"trace_{i}"] for i in range(n)], int(z["num_experts"]), int(z["top_k"]))
