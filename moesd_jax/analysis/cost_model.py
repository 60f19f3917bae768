"""The MoESD cost model: bytes, FLOPs and roofline time of a forward, and SD speedup.

The one place the project's performance formulas live: ``bench.py decode`` and
``bench.py costmodel`` predictions, ``scripts/predict_speedup.py`` and the routing
report's Amdahl split all read from here.

A forward of the target over ``B`` rows of ``T`` tokens each (T = 1: a plain decode
step; T = K + 1: a chain verification; T = N + 1: a tree of N nodes), after ``C``
cached tokens per row, is split into parts, each with the bytes it must move and the
FLOPs it must do:

  attention   q/k/v/o projections: every weight once, ``2 * B*T * params`` FLOPs
  attn_core   the KV cache read (``B * (C + T)`` entries per layer) and QK/PV FLOPs
  dense_mlp   dense MLP layers (a dense model's every layer)
  router      the MoE router
  experts     the routed experts: each *unique* expert's weights once (``U`` per layer,
              from the independence formula ``N (1 - (1 - k/N)^(B*T))`` or a measured
              trace), ``2 * B*T*k * 3 D F`` FLOPs
  shared      an always-on shared expert (Qwen2-MoE, the bundled target)
  lm_head     the output projection for all ``B*T`` positions

A part's time is its roofline ``max(bytes / bandwidth, FLOPs / matmul_throughput)``; the
forward's time is the sum over parts plus fixed overheads (per step and per layer). On
hardware whose engine runs experts in row chunks (CPU ``gather``: ``models.moe.row_chunk``
rows per dot, each chunk re-reading its expert's weights), the expert part is the
expected number of chunks times one chunk dot, with throughput measured per row count
(:func:`calibrate_cpu`); elsewhere an expert's rows go through one grouped matmul.

Speculative decoding (MoESD's model): with ``sigma`` the expected tokens one iteration
commits (:func:`expected_tokens`: 1 + the expected accepted drafts), the SD speedup over
plain decoding at batch B is

    speedup = sigma * t(B, 1) / (K * t_draft(B) + t(B, K + 1))

(the rejection sampling is inside the verify forward's time here; add it to the draft
side if it is not). **Target efficiency** is defined here as

    target_efficiency(B, T) = t(B, 1) / t(B, T),

the cost of a one-token step over the cost of a T-token verification at the same batch
and context: 1 when verifying T tokens is as cheap as decoding one (memory-bound, no
extra bytes), 1/T when it costs T steps (compute-bound). SD can only win where
``sigma * target_efficiency(B, K+1) > 1`` (before the draft's cost).

Hardware presets (``configs/hardware/presets.yaml``, cited there): ``tpu-v4``,
``tpu-v5e``, ``tpu-v5p``, ``tpu-v6e``, ``a100``, ``h100``, ``h200``, and ``cpu-measured``
(calibrated on this machine by :func:`calibrate_cpu`, cached as JSON).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from moesd_jax.config import REPO_CONFIGS, ModelConfig

PRESETS_FILE = REPO_CONFIGS / "hardware" / "presets.yaml"
CPU_CALIBRATION = (Path(os.environ.get("MOESD_JAX_CACHE", "~/.cache/moesd_jax")).expanduser()
                   / "cpu-measured.json")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "int8": 1}


# -- hardware -----------------------------------------------------------------------------
Dot = tuple[int, int, float]  # (weight bytes, rows, seconds) of one measured dot


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One chip as the cost model sees it.

    Accelerator presets are rooflines: a part takes ``max(bytes / mem_bandwidth, FLOPs /
    peak_flops)``. A measured CPU preset carries dot tables instead: the measured time of
    a ``[rows, K] x [K, N]`` float32 dot by weight size and row count, with its weights
    coming from memory (``dots_cold``) or already in the last-level cache (``dots_hot``,
    an expert's second and later row chunks); other sizes are interpolated (log-log).
    On this kind of CPU memory traffic and arithmetic hardly overlap at these shapes, so
    a measured table predicts a dot far better than ``max`` of two peaks.

    Attributes:
      name: preset id (``h100``, ``tpu-v5e``, ``cpu-measured``, ...).
      peak_flops: matmul peak, FLOP/s. mem_bandwidth: read bandwidth, bytes/s.
      step_overhead_s, layer_overhead_s: fixed time per forward and per layer.
      dots_cold, dots_hot: measured dot tables (empty: roofline).
      cache_bytes: last-level cache size (an expert smaller than this is read from memory
        once per step even when the engine runs it in several row chunks).
      expert_row_chunks: the engine computes experts in row chunks
        (``models.moe.row_chunk``; CPU ``gather``), each chunk one dot per weight matrix.
      chunks_cold, chunks_hot: measured ``(expert bytes, rows, seconds)`` of one row
        chunk of the engine's ``gather`` dispatch (the expert's three SwiGLU dots plus its
        loop and branch overhead), the expert read from memory (its first chunk in a
        step) or already in cache (its later chunks); used instead of the dot tables for
        routed experts when present.
      attn_unit_s, attn_elem_s: measured attention core (``models.attention.
        cached_attention``) per layer: ``units * (attn_unit_s + attn_elem_s * R*T*C)``
        with ``units = B * G * kv_blocks`` (one small batched dot per row, kv head and
        KV block, each ``R*T`` queries of width ``C``); 0: roofline. On XLA:CPU these
        small dots run one by one, so at batch 64 the core costs ~100x its bytes' time.
      hbm_bytes: memory of one chip (informational). source: where figures come from.
    """

    name: str
    peak_flops: float
    mem_bandwidth: float
    step_overhead_s: float = 0.0
    layer_overhead_s: float = 0.0
    dots_cold: tuple[Dot, ...] = ()
    dots_hot: tuple[Dot, ...] = ()
    cache_bytes: int = 0
    expert_row_chunks: bool = False
    chunks_cold: tuple[Dot, ...] = ()
    chunks_hot: tuple[Dot, ...] = ()
    attn_unit_s: float = 0.0
    attn_elem_s: float = 0.0
    hbm_bytes: int = 0
    source: str = ""

    def dot_time(self, k: int, n: int, rows: float, weight_bytes: int, hot: bool = False) -> float:
        """Seconds for a ``[rows, k] x [k, n]`` dot with ``weight_bytes`` bytes per weight."""
        nbytes = k * n * weight_bytes
        flops = 2.0 * rows * k * n
        tab = self.dots_hot if hot and self.dots_hot else self.dots_cold
        if not tab:
            return max(nbytes / self.mem_bandwidth, flops / self.peak_flops)
        return nbytes * _interp_per_byte(tab, nbytes, rows)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for f in ("dots_cold", "dots_hot", "chunks_cold", "chunks_hot"):
            d[f] = [list(x) for x in getattr(self, f)]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Hardware:
        d = dict(d)
        for f in ("dots_cold", "dots_hot", "chunks_cold", "chunks_hot"):
            d[f] = tuple((int(b), int(r), float(t)) for b, r, t in d.get(f, ()))
        return cls(**d)

    def chunk_time(self, expert_bytes: int, rows: int, hot: bool) -> float | None:
        """Seconds of one engine row chunk of an expert of ``expert_bytes`` (None: not
        measured)."""
        tab = self.chunks_hot if hot else self.chunks_cold
        if not tab:
            return None
        return expert_bytes * _interp_per_byte(tab, expert_bytes, rows)


def _interp_per_byte(tab: Sequence[Dot], nbytes: float, rows: float) -> float:
    """Seconds per weight byte at (nbytes, rows): log-log interpolation over rows for each
    measured weight size, then over weight size (clamped at the ends)."""
    sizes = sorted({b for b, _, _ in tab})
    per_size = []
    for size in sizes:
        pts = sorted((r, t / size) for b, r, t in tab if b == size)
        xs = np.log([p[0] for p in pts])
        ys = np.log([p[1] for p in pts])
        lr = np.log(max(rows, 1e-9))
        if lr > xs[-1] and len(xs) > 1:  # beyond the table: time grows with rows
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            per_size.append(ys[-1] + slope * (lr - xs[-1]))
        else:
            per_size.append(float(np.interp(lr, xs, ys)))
    if len(sizes) == 1:
        return float(np.exp(per_size[0]))
    return float(np.exp(np.interp(np.log(nbytes), np.log(sizes), per_size)))


def preset_names() -> list[str]:
    return sorted(yaml.safe_load(PRESETS_FILE.read_text())) + ["cpu-measured"]


def preset(name: str, calibration: str | Path | None = None) -> Hardware:
    """A hardware preset by id (case-insensitive). ``cpu-measured`` reads the calibration
    JSON (``calibration`` or the cached one, see :data:`CPU_CALIBRATION`) and runs
    :func:`calibrate_cpu` (about a minute) when there is none."""
    key = name.lower()
    if key == "cpu-measured":
        path = Path(calibration) if calibration else CPU_CALIBRATION
        if path.exists():
            return Hardware.from_json(json.loads(path.read_text()))
        hw = calibrate_cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(hw.to_json(), indent=1))
        return hw
    table = yaml.safe_load(PRESETS_FILE.read_text())
    if key not in table:
        raise ValueError(f"hardware={name!r} is not a preset; choose one of {preset_names()}")
    d = dict(table[key])
    for f in ("peak_flops", "mem_bandwidth", "step_overhead_s", "layer_overhead_s"):
        d[f] = float(d.get(f, 0.0))  # YAML 1.1 reads 1.0e9 (no exponent sign) as a string
    d["hbm_bytes"] = int(d.get("hbm_bytes", 0))
    return Hardware(name=key, **d)


# -- CPU calibration ------------------------------------------------------------------------
def _median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def read_bandwidth(nbytes: int = 512 << 20, repeats: int = 7) -> dict[str, float]:
    """Read bandwidth (bytes/s) over a buffer larger than any cache, two ways.

    numpy's ``sum`` runs on one core and is partly compute-bound (11 GB/s on the 2-core
    development machine where two cores read 19 GB/s), so the jitted XLA ``jnp.sum`` (all
    cores) is measured too; ``peak`` is the larger.
    """
    import jax
    import jax.numpy as jnp

    a = np.ones(nbytes // 4, np.float32)
    x = jnp.asarray(a)
    xla_sum = jax.jit(jnp.sum)
    out = {"numpy_sum": nbytes / _median_time(a.sum, repeats),
           "xla_sum": nbytes / _median_time(lambda: xla_sum(x).block_until_ready(), repeats)}
    out["peak"] = max(out.values())
    return out


DOT_SHAPES = ((1024, 1024), (1024, 4096), (1024, 32768))  # 4, 16, 128 MB in float32
DOT_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _table(times: dict[tuple[int, int], list[float]]) -> list[Dot]:
    """``(bytes, rows, seconds)`` rows of a measured table: the median of each entry's
    passes, then made non-decreasing in rows for each weight size (more rows over the same
    weights never cost less; a lower later entry bounds the earlier ones, which removes
    one-off slow outliers)."""
    out = []
    for nb in sorted({b for b, _ in times}):
        rows = sorted(r for b, r in times if b == nb)
        ts = [statistics.median(times[nb, r]) for r in rows]
        for i in range(len(ts) - 2, -1, -1):
            ts[i] = min(ts[i], ts[i + 1])
        out += [(nb, r, t) for r, t in zip(rows, ts)]
    return out


def measure_dots(shapes: Sequence[tuple[int, int]] = DOT_SHAPES,
                 rows: Sequence[int] = DOT_ROWS, hot: bool = False, repeats: int = 3,
                 pool_bytes: int = 256 << 20, passes: int = 3) -> list[Dot]:
    """Measured ``(weight bytes, rows, seconds)`` of float32 ``[rows, K] x [K, N]`` dots.

    One jitted call runs a chain of dependent dots (as a forward does: no concurrency
    between them, no per-call dispatch cost in the figure), each on its own weight buffer
    (``hot=False``: > ``pool_bytes`` of weights, so every dot reads from memory) or all on
    one buffer (``hot=True``: the weights stay in cache). ``passes`` sweeps over the row
    counts, interleaved so that a slow spell of the machine hits one pass of every entry
    rather than every pass of one; each entry is the median of its passes' medians of
    ``repeats`` calls (:func:`_table`).
    """
    import jax
    import jax.numpy as jnp

    times: dict[tuple[int, int], list[float]] = collections.defaultdict(list)
    for k, n in shapes:
        nb = k * n * 4
        n_w = 8 if hot else max(2, -(-pool_bytes // nb))
        w0 = [jnp.asarray(np.random.default_rng(i).standard_normal((k, n)) / np.sqrt(k),
                          jnp.float32) for i in range(1 if hot else n_w)]
        ws = tuple(w0[i % len(w0)] for i in range(n_w))

        m = min(k, n)

        def chain(x, ws, m=m):
            # the next dot depends on this one through an elementwise op on its output,
            # as a forward's dots do. (Through a reduction, jnp.sum(x @ w), the same dots
            # measured up to 1.6x slower at 256-512 rows on XLA:CPU, and the cost model
            # over-predicted forwards of that many rows by 35-46%.)
            for w in ws:
                x = x.at[:, :m].add(1e-6 * (x @ w)[:, :m])
            return x

        fn = jax.jit(chain)
        xs = {r: jnp.ones((r, k), jnp.float32) for r in rows}
        for _ in range(passes):
            for r in rows:
                t = _median_time(lambda x=xs[r], fn=fn, ws=ws: jax.block_until_ready(fn(x, ws)),
                                 repeats)
                times[nb, int(r)].append(t / n_w)
        del w0, ws
    return _table(times)


def measure_expert_chunks(d: int = 1024, f: int = 1024, experts: int = 64,
                          rows: Sequence[int] = (1, 2, 4, 8), repeats: int = 3,
                          passes: int = 3) -> tuple[list[Dot], list[Dot]]:
    """One row chunk of the engine's ``gather`` dispatch (``models.moe.dispatch_gather``
    with per-expert weight arrays, as CPU decoding holds them), measured: (cold, hot)
    ``(expert bytes, rows, seconds)``.

    Cold: ``experts * c`` tokens routed top-1 so that every expert gets exactly c rows,
    one chunk each, each expert read from memory (``experts`` x 12 MB > any cache). Hot:
    the same number of tokens on ``experts / 8`` experts, 8 chunks each; the first is
    cold, the other 7 find the expert in cache. Passes as in :func:`measure_dots`.
    """
    import jax
    import jax.numpy as jnp

    from moesd_jax.models.moe import dispatch_gather

    rng = np.random.default_rng(0)
    mk = lambda *shape: tuple(jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]),  # noqa: E731
                                          jnp.float32) for _ in range(experts))
    wg, wu, wd = mk(d, f), mk(d, f), mk(f, d)
    fn = jax.jit(lambda x, ids, w: dispatch_gather(x, wg, wu, wd, ids, w))
    nb = 3 * d * f * 4
    n_few = experts // 8
    cold: dict[tuple[int, int], list[float]] = collections.defaultdict(list)
    hot: dict[tuple[int, int], list[float]] = collections.defaultdict(list)
    inputs = {}
    for c in rows:
        t = experts * c
        inputs[c] = (jnp.asarray(rng.standard_normal((t, d)), jnp.float32),
                     jnp.ones((t, 1), jnp.float32),
                     jnp.asarray(np.repeat(np.arange(experts), c)[:, None], jnp.int32),
                     jnp.asarray(np.repeat(np.arange(n_few), 8 * c)[:, None], jnp.int32))
    for _ in range(passes):
        for c in rows:
            x, w, spread, few = inputs[c]

            def run(ids, x=x, w=w):
                return lambda: jax.block_until_ready(fn(x, ids, w))

            tc = _median_time(run(spread), repeats) / experts
            tf = _median_time(run(few), repeats)
            cold[nb, int(c)].append(tc)
            hot[nb, int(c)].append(max(tf - n_few * tc, 0.0) / (n_few * 7))
    return _table(cold), _table(hot)


ATTN_BATCHES = (1, 4, 16, 64)
ATTN_TOKENS = (1, 2, 4, 8)


def measure_attention(batches: Sequence[int] = ATTN_BATCHES,
                      tokens: Sequence[int] = ATTN_TOKENS, kv_heads: int = 8, rep: int = 2,
                      head_dim: int = 64, context: int = 32, layers: int = 4,
                      repeats: int = 3, passes: int = 3) -> tuple[float, float]:
    """``(attn_unit_s, attn_elem_s)``: the attention core's cost per layer, fitted (least
    squares, relative error) to ``units * (unit + elem * R*T*C)`` over measured
    ``cached_attention`` calls (``units = B * G * kv_blocks``), ``layers`` layers per
    jitted call as a forward chains them. Passes interleaved as in :func:`measure_dots`.
    """
    import jax
    import jax.numpy as jnp

    from moesd_jax.models.attention import KV_BLOCK, cached_attention

    g, r, c = kv_heads, rep, head_dim
    slots = -(-(context + max(tokens)) // KV_BLOCK) * KV_BLOCK
    fn = jax.jit(lambda q, kc, vc, st: sum(
        jnp.sum(cached_attention(q, kc, vc, i, st)) for i in range(layers)))
    times: dict[tuple[int, int], list[float]] = collections.defaultdict(list)
    for _ in range(passes):
        for b in batches:
            kc = jnp.zeros((layers, b, slots, g, c), jnp.float32)
            st = jnp.full((b,), context, jnp.int32)
            for t in tokens:
                q = jnp.ones((b, t, g, r, c), jnp.float32)
                times[b, t].append(_median_time(
                    lambda q=q, kc=kc, st=st: jax.block_until_ready(fn(q, kc, kc, st)),
                    repeats) / layers)
    xs, ys = [], []
    for (b, t), ts in times.items():
        units = b * g * -(-(context + t) // KV_BLOCK)
        meas = statistics.median(ts)
        xs.append([units / meas, units * r * t * c / meas])  # rows scaled: relative error
        ys.append(1.0)
    (unit, elem), *_ = np.linalg.lstsq(np.asarray(xs), np.asarray(ys), rcond=None)
    return max(float(unit), 0.0), max(float(elem), 0.0)


def calibrate_cpu(repeats: int = 3, passes: int = 3) -> Hardware:
    """``cpu-measured``: this machine's read bandwidth, dot tables (weights from memory
    and from cache), last-level cache size, and the fixed overheads of a forward (per
    step and per layer, from tiny models whose time is all overhead). A few minutes
    (``passes`` interleaved sweeps of every table, see :func:`measure_dots`)."""
    import jax

    bw = read_bandwidth()["peak"]
    cold = measure_dots(repeats=repeats, passes=passes)
    hot = measure_dots(shapes=DOT_SHAPES[:1], hot=True, repeats=repeats, passes=passes)
    peak = max(2.0 * r * nb / 4 / t for nb, r, t in cold + hot)
    step_oh, layer_oh = _measure_overheads(repeats)
    ch_cold, ch_hot = measure_expert_chunks(repeats=repeats, passes=passes)
    attn_unit, attn_elem = measure_attention(repeats=repeats, passes=passes)
    return Hardware(name="cpu-measured", peak_flops=peak, mem_bandwidth=bw,
                    attn_unit_s=attn_unit, attn_elem_s=attn_elem,
                    step_overhead_s=step_oh, layer_overhead_s=layer_oh, dots_cold=tuple(cold),
                    dots_hot=tuple(hot), cache_bytes=_llc_bytes(), expert_row_chunks=True,
                    chunks_cold=tuple(ch_cold), chunks_hot=tuple(ch_hot),
                    source=f"calibrate_cpu() on {os.uname().nodename}, {os.cpu_count()} CPUs, "
                           f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")


def median_hardware(hws: Sequence[Hardware]) -> Hardware:
    """Several calibrations of one machine as one: every scalar figure the median of
    theirs, every table entry (weight bytes, rows) the median of its values (then made
    non-decreasing in rows, as :func:`_table`); the rest from the first."""
    if not hws:
        raise ValueError("median_hardware needs at least one calibration")
    med = lambda f: float(statistics.median(getattr(h, f) for h in hws))  # noqa: E731
    tables = {}
    for f in ("dots_cold", "dots_hot", "chunks_cold", "chunks_hot"):
        times: dict[tuple[int, int], list[float]] = collections.defaultdict(list)
        for h in hws:
            for nb, r, t in getattr(h, f):
                times[nb, r].append(t)
        tables[f] = tuple(_table(times))
    scalars = {f: med(f) for f in ("peak_flops", "mem_bandwidth", "step_overhead_s",
                                   "layer_overhead_s", "attn_unit_s", "attn_elem_s")}
    src = hws[0].source + (f"; median of {len(hws)} calibrations" if len(hws) > 1 else "")
    return dataclasses.replace(hws[0], **scalars, **tables, source=src)


def _llc_bytes() -> int:
    """The largest CPU cache (sysfs), or 0 if unknown."""
    best = 0
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        txt = p.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        try:
            best = max(best, int(txt.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best


def _tiny(layers: int) -> ModelConfig:
    from moesd_jax.config import MoEConfig

    return ModelConfig(vocab_size=64, d_model=32, num_layers=layers, num_heads=2,
                       num_kv_heads=2, mlp_dim=32, max_seq_len=128, eos_token_ids=(),
                       moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32, dispatch="gather"))


def _measure_overheads(repeats: int) -> tuple[float, float]:
    """(per-step, per-layer) seconds: a 1-layer and a 3-layer tiny MoE model's T=1
    forward at batch 1; their weights are a few KB, so their time is dispatch overhead."""
    from moesd_jax.bench_decode import forward_time, make_model

    ts = {}
    for layers in (1, 3):
        cfg = _tiny(layers)
        graphdef, state = make_model(cfg)
        ts[layers] = forward_time(graphdef, state, cfg, 1, 1, 16, 128, repeats=max(repeats, 9))[0]
    per_layer = max((ts[3] - ts[1]) / 2, 0.0)
    return max(ts[1] - per_layer, 0.0), per_layer


# -- the model -----------------------------------------------------------------------------
def expected_unique_experts(num_experts: int, top_k: int, tokens: float) -> float:
    """Independent routing: ``N (1 - (1 - k/N)^T)`` distinct experts for T tokens (MoESD).

    E.g. OLMoE (64, 8): T = 4 -> 26.5, T = 8 -> 42.0; Mixtral (8, 2): T = 4 -> 5.47.
    """
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def expected_chunks(num_experts: int, top_k: int, tokens: int, chunk: int) -> float:
    """Expected row-chunk dots per layer when each of the E experts runs its routed rows in
    chunks of ``chunk``: ``E * sum_n P(n) ceil(n / chunk)``, n ~ Binomial(tokens, k/E)
    (independent routing)."""
    if tokens <= 0:
        return 0.0
    p = top_k / num_experts
    if p >= 1.0:
        return num_experts * math.ceil(tokens / chunk)
    return float(num_experts * np.sum(_binomial_pmf(tokens, p) * np.ceil(
        np.arange(tokens + 1) / chunk)))


def chunks_given_unique(unique: float, routed_rows: float, chunk: int) -> float:
    """Expected row-chunk dots of one layer whose ``routed_rows`` (token, expert) rows went
    to ``unique`` distinct experts (e.g. counted in a routing trace): each active expert
    holds one row plus its share of the rest, ``1 + Binomial(routed - U, 1 / U)``, and
    runs ``ceil(rows / chunk)`` chunks. (``U + (routed - U) / chunk`` instead would count
    a partly filled chunk per expert that ceil does not: e.g. U experts of exactly
    ``chunk`` rows each run U chunks, not ~2U.)"""
    u = float(unique)
    if u <= 0:
        return 0.0
    extra = int(round(max(float(routed_rows) - u, 0.0)))
    if u <= 1.0 or extra == 0:
        return u * math.ceil((1 + extra / max(u, 1.0)) / chunk)
    return float(u * np.sum(_binomial_pmf(extra, 1.0 / u) * np.ceil(
        (1 + np.arange(extra + 1)) / chunk)))


def _binomial_pmf(trials: int, p: float) -> np.ndarray:
    n = np.arange(trials + 1)
    lg = np.vectorize(math.lgamma)
    return np.exp(lg(trials + 1) - lg(n + 1) - lg(trials - n + 1) + n * np.log(p)
                  + (trials - n) * np.log1p(-p))


@dataclasses.dataclass(frozen=True)
class Part:
    bytes: float
    flops: float
    time_s: float


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One forward: per-part bytes/FLOPs/time, the overhead, and the totals."""

    parts: dict[str, Part]
    overhead_s: float
    unique_experts: float  # per MoE layer (0 for dense)

    @property
    def time_s(self) -> float:
        return sum(p.time_s for p in self.parts.values()) + self.overhead_s

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.parts.values())

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.parts.values())

    @property
    def expert_time_s(self) -> float:
        """Time of the routed experts (the part expert budgets and routing affect)."""
        return self.parts["experts"].time_s if "experts" in self.parts else 0.0

    @property
    def expert_fraction(self) -> float:
        """Amdahl: the share of the step spent in routed experts."""
        return self.expert_time_s / self.time_s


def dense_equivalent(cfg: ModelConfig) -> ModelConfig:
    """The dense model of equal active size: every MoE layer's routed experts become one
    MLP ``top_k * expert_dim`` wide (plus the shared expert's width)."""
    m = cfg.moe
    if m is None:
        return cfg
    width = m.top_k * m.expert_dim + m.shared_expert_dim
    return dataclasses.replace(cfg, moe=None, mlp_dim=width)


def _roof(hw: Hardware, nbytes: float, flops: float) -> Part:
    return Part(nbytes, flops, max(nbytes / hw.mem_bandwidth, flops / hw.peak_flops))


def _dots(hw: Hardware, shapes: Sequence[tuple[int, int]], rows: float, wb: int,
          count: float = 1.0, hot: bool = False) -> Part:
    """``count`` times one dot with each weight shape in ``shapes`` over ``rows`` rows."""
    nbytes = sum(k * n for k, n in shapes) * wb * count
    flops = sum(2.0 * rows * k * n for k, n in shapes) * count
    t = sum(hw.dot_time(k, n, rows, wb, hot) for k, n in shapes) * count
    return Part(nbytes, flops, t)


def _add(*parts: Part) -> Part:
    return Part(sum(p.bytes for p in parts), sum(p.flops for p in parts),
                sum(p.time_s for p in parts))


def step_cost(cfg: ModelConfig, hw: Hardware, batch: int, tokens: int = 1,
              context: int = 512, unique_experts: float | Sequence[float] | None = None,
              weight_dtype: str | None = None, expert_rows=None) -> StepCost:
    """Cost of one forward of ``batch`` rows x ``tokens`` tokens after ``context`` cached
    tokens per row (see the module docstring for the parts).

    Args:
      unique_experts: distinct experts per MoE layer (a number, or one per layer, e.g.
        from a routing trace); None = the independence formula for ``batch * tokens``.
      expert_rows: instead, the rows each expert got in this forward, ``[MoE layers, E]``
        (from a routing trace): gives the unique experts and, on an engine that runs
        experts in row chunks, the exact chunk count ``sum ceil(rows / chunk)``.
      weight_dtype: bytes per weight from this dtype; None = ``cfg.param_dtype`` (the
        CPU preset uses ``cfg.compute_dtype``: CPU decoding holds weights in it).
    """
    if batch < 1 or tokens < 1 or context < 0:
        raise ValueError(f"batch={batch} and tokens={tokens} must be >= 1, context={context} "
                         ">= 0")
    wdt = weight_dtype or (cfg.compute_dtype if hw.expert_row_chunks else cfg.param_dtype)
    wb = _DTYPE_BYTES[wdt]
    kvb = _DTYPE_BYTES[cfg.compute_dtype]
    d, dh, h, g = cfg.d_model, cfg.dh, cfg.num_heads, cfg.num_kv_heads
    m_rows = batch * tokens
    layers = cfg.num_layers
    n_moe = sum(cfg.is_moe_layer(i) for i in range(layers)) if cfg.moe else 0
    n_dense = layers - n_moe
    parts: dict[str, Part] = {}

    parts["attention"] = _dots(hw, [(d, h * dh), (d, g * dh), (d, g * dh), (h * dh, d)],
                               m_rows, wb, layers)
    kv_entries = batch * (context + tokens)
    parts["attn_core"] = _roof(hw, layers * kv_entries * 2 * g * dh * kvb,
                               layers * 4 * m_rows * h * dh * (context + tokens))
    if hw.attn_unit_s or hw.attn_elem_s:  # measured: per (row, kv head, KV block) dot
        from moesd_jax.models.attention import KV_BLOCK

        units = batch * g * -(-(context + tokens) // KV_BLOCK)
        per_layer = units * (hw.attn_unit_s + hw.attn_elem_s * (h // g) * tokens * dh)
        parts["attn_core"] = dataclasses.replace(parts["attn_core"],
                                                 time_s=layers * per_layer)
    mlp = lambda f: [(d, f), (d, f), (f, d)]  # noqa: E731  SwiGLU: gate, up, down
    if n_dense:
        parts["dense_mlp"] = _dots(hw, mlp(cfg.mlp_dim), m_rows, wb, n_dense)
    u = 0.0
    if n_moe:
        m = cfg.moe
        parts["router"] = _dots(hw, [(d, m.num_experts)], m_rows, wb, n_moe)
        pe = 3 * d * m.expert_dim
        if expert_rows is not None:
            if unique_experts is not None:
                raise ValueError("give unique_experts or expert_rows, not both")
            er = np.asarray(expert_rows, np.float64)
            if er.ndim != 2 or er.shape[0] != n_moe:
                raise ValueError(f"expert_rows has shape {er.shape}; need ({n_moe}, experts)")
            unique_experts = (er > 0).sum(axis=1).tolist()
        if unique_experts is None:
            u_layers = [expected_unique_experts(m.num_experts, m.top_k, m_rows)] * n_moe
        elif np.isscalar(unique_experts):
            u_layers = [float(unique_experts)] * n_moe
        else:
            u_layers = [float(x) for x in unique_experts]
            if len(u_layers) != n_moe:
                raise ValueError(f"unique_experts has {len(u_layers)} values for {n_moe} MoE "
                                 "layers")
        u = float(np.mean(u_layers))
        routed_rows = m_rows * m.top_k
        if hw.expert_row_chunks:
            from moesd_jax.models.moe import row_chunk

            c = row_chunk(m_rows, m.top_k, m.num_experts)
            if expert_rows is not None:
                chunks = float(np.sum(np.ceil(er / c)))
            elif unique_experts is None:
                chunks = n_moe * expected_chunks(m.num_experts, m.top_k, m_rows, c)
            else:  # measured U: the routed rows spread over the U active experts
                chunks = sum(chunks_given_unique(ul, routed_rows, c) for ul in u_layers)
            first = sum(u_layers)  # each expert's first chunk reads it from memory
            later_hot = pe * wb <= hw.cache_bytes
            t_cold = hw.chunk_time(pe * wb, c, hot=False)
            if t_cold is not None:  # measured engine chunks
                t_later = hw.chunk_time(pe * wb, c, hot=later_hot)
                parts["experts"] = Part(chunks * pe * wb, chunks * 2 * c * pe,
                                        first * t_cold + (chunks - first) * t_later)
            else:
                parts["experts"] = _add(
                    _dots(hw, mlp(m.expert_dim), c, wb, first),
                    _dots(hw, mlp(m.expert_dim), c, wb, chunks - first, hot=later_hot))
        else:  # one grouped matmul per layer: unique experts' bytes, routed rows' FLOPs
            parts["experts"] = _roof(hw, sum(u_layers) * pe * wb, 2 * routed_rows * n_moe * pe)
        if m.shared_expert_dim:
            sh = mlp(m.shared_expert_dim) + ([(d, 1)] if m.shared_expert_gate else [])
            parts["shared"] = _dots(hw, sh, m_rows, wb, n_moe)
    parts["lm_head"] = _dots(hw, [(d, cfg.vocab_size)], m_rows, wb)
    overhead = hw.step_overhead_s + layers * hw.layer_overhead_s
    return StepCost(parts, overhead, u)


def step_time(cfg: ModelConfig, hw: Hardware, batch: int, tokens: int = 1, **kw) -> float:
    return step_cost(cfg, hw, batch, tokens, **kw).time_s


def target_efficiency(cfg: ModelConfig, hw: Hardware, batch: int, tokens: int,
                      **kw) -> float:
    """``t(B, 1) / t(B, T)``: see the module docstring (1 = verification is free)."""
    return step_time(cfg, hw, batch, 1, **kw) / step_time(cfg, hw, batch, tokens, **kw)


def expected_tokens(acceptance: float | Sequence[float], k: int) -> float:
    """``sigma``: expected tokens one chain iteration of K drafts commits.

    ``acceptance`` is a per-position acceptance rate (the same for every position) or K
    rates ``a_1..a_K`` (draft i is accepted given drafts < i were): sigma = 1 +
    sum_i prod_{j <= i} a_j (the bonus/correction token plus the accepted drafts).
    """
    if np.isscalar(acceptance):
        rates = [float(acceptance)] * k
    else:
        rates = [float(a) for a in acceptance]
        if len(rates) < k:
            raise ValueError(f"{len(rates)} acceptance rates for k={k}")
    if any(not 0.0 <= a <= 1.0 for a in rates):
        raise ValueError(f"acceptance={acceptance} must be in [0, 1]")
    sigma, run = 1.0, 1.0
    for a in rates[:k]:
        run *= a
        sigma += run
    return sigma


def chain_token_moments(rate, k: int, xp=np) -> tuple:
    """Mean and variance of the tokens one chain iteration of ``k`` drafts commits when
    each draft is accepted with probability ``rate`` given the previous ones (array
    rates broadcast): tokens = 1 + X, ``X = min(G, k)``, ``P(X >= j) = rate^j``; mean
    :func:`expected_tokens`, ``E[X^2] = sum_{j <= k} (2j - 1) rate^j``. ``xp``: numpy
    (float64) or ``jax.numpy`` (float32, inside the decode loop's controller)."""
    dt = xp.float64 if xp is np else xp.float32
    p = xp.clip(xp.asarray(rate, dt), 0.0, 1.0)
    j = xp.arange(1, k + 1, dtype=dt)
    pj = p[..., None] ** j
    ex = xp.sum(pj, axis=-1)
    return 1.0 + ex, xp.maximum(xp.sum((2 * j - 1) * pj, axis=-1) - ex * ex, 0.0)


def static_batch_iterations(rates_SB, new_tokens_B, k: int, seed: int = 0) -> float:
    """Expected loop iterations of a *static* batch decoding ``new_tokens_B`` tokens per
    row with chains of ``k`` drafts: ``E[max_r N_r]``, the loop running until its slowest
    row is done (rows that finish early idle; a server that refills slots does not pay
    this). ``rates_SB`` [S, B]: S draws of the rows' per-draft acceptance rates (their
    spread across prompts is what makes one row the straggler). Each ``N_r`` is the
    renewal count of iterations to commit ``n_r`` tokens, ``n_r / mu`` with variance
    ``n_r var / mu^3`` (normal approximation, one normal draw per row and sample).
    ``k = 0``: plain decoding, ``max_r n_r`` exactly."""
    n = np.asarray(new_tokens_B, np.float64)
    if k == 0:
        return float(np.max(n))
    mu, var = chain_token_moments(rates_SB, k)
    z = np.random.default_rng(seed).standard_normal(np.shape(mu))
    iters = n / mu + z * np.sqrt(n * var / mu ** 3)
    return float(np.mean(np.max(np.maximum(iters, np.ceil(n / (k + 1))), axis=-1)))


def iteration_costs(t_target, t_draft: float, k_max: int) -> np.ndarray:
    """cost(K) of one SD iteration relative to a plain decode step, K = 0..K_max:
    ``(K t_draft + t_target(K + 1)) / t_target(1)`` (cost(0) = 1), from target forward
    times by token count (a callable or a dict ``T -> seconds``: modelled here or timed
    on the device) and the draft's step time. The denominator of :func:`sd_speedup` and
    the utility controller's costs (``spec/utility.py``)."""
    tt = t_target.__getitem__ if isinstance(t_target, dict) else t_target
    t1 = tt(1)
    return np.asarray([1.0] + [iteration_cost(t1, tt(k + 1), t_draft, k)
                               for k in range(1, k_max + 1)], np.float32)


def iteration_cost(t_step: float, t_verify: float, t_draft: float, k: int) -> float:
    """One SD iteration (K draft steps + a (K+1)-token verification) over a plain step."""
    return (k * t_draft + t_verify) / t_step


def draft_step_time(draft: ModelConfig | float | None, hw: Hardware, batch: int,
                    t_step: float, context: int = 512) -> float:
    """Seconds of one draft step: None = free (an oracle, prompt lookup), a draft model's
    config = its T = 1 step on ``hw``, a number = that fraction of the target's step
    ``t_step``."""
    if draft is None:
        return 0.0
    if isinstance(draft, ModelConfig):
        return step_time(draft, hw, batch, 1, context=context)
    return float(draft) * t_step


def model_iteration_costs(target_cfg: ModelConfig, hw: Hardware, batch: int, k_max: int,
                          draft: ModelConfig | float | None = None,
                          context: int = 256) -> np.ndarray:
    """:func:`iteration_costs` from this model's step times on ``hw`` (``--k auto
    --auto-costs model``)."""
    t = lambda n: step_time(target_cfg, hw, batch, n, context=context)  # noqa: E731
    return iteration_costs(t, draft_step_time(draft, hw, batch, t(1), context), k_max)


def sd_speedup(cfg: ModelConfig, hw: Hardware, batch: int, k: int,
               acceptance: float | Sequence[float], draft: ModelConfig | float | None = None,
               context: int = 512, **kw) -> dict:
    """Predicted SD speedup of a K-draft chain over plain decoding at batch B.

    ``draft``: None (free, an oracle), a draft model's config (its T=1 step on the same
    hardware, K times per iteration), or a number: the draft step as a fraction of the
    target's T=1 step. Returns ``speedup``, ``sigma``, ``target_efficiency``, and the
    step times in seconds.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    t1 = step_time(cfg, hw, batch, 1, context=context, **kw)
    tv = step_time(cfg, hw, batch, k + 1, context=context, **kw)
    td = draft_step_time(draft, hw, batch, t1, context)
    sigma = expected_tokens(acceptance, k)
    cost = iteration_cost(t1, tv, td, k)
    return {"speedup": sigma / cost, "sigma": sigma,
            "target_efficiency": t1 / tv, "t_step_s": t1, "t_verify_s": tv, "t_draft_s": td}


DEFAULT_DRAFT_RATIO = 0.143  # Cohere: a draft step costs 14.3% of a target step


def eagle_like_draft(cfg: ModelConfig) -> ModelConfig:
    """An EAGLE-style one-layer dense drafter for ``cfg``: one decoder layer of the target's
    width (MLP as wide as the target's active MLP) and the full-vocabulary head."""
    width = (cfg.moe.top_k * cfg.moe.expert_dim + cfg.moe.shared_expert_dim
             if cfg.moe else cfg.mlp_dim)
    return dataclasses.replace(cfg, num_layers=1, moe=None, mlp_dim=width)


def speedup_curve(cfg: ModelConfig, hw: Hardware, batches: Sequence[int], ks: Sequence[int],
                  acceptance: float | Sequence[float] = 0.8,
                  draft: str | float | ModelConfig | None = DEFAULT_DRAFT_RATIO,
                  context: int = 512) -> list[dict]:
    """SD speedup vs batch for each K, for ``cfg`` and its dense equivalent (same
    drafter for both). ``draft``: a number (the draft step as a fraction of each target's
    T = 1 step; default Cohere's measured 0.143), ``"eagle"`` (:func:`eagle_like_draft` of
    the MoE config, costed on ``hw``), a draft ModelConfig, or None (free). One dict per
    (batch, k)."""
    dense = dense_equivalent(cfg)
    d = eagle_like_draft(cfg) if draft == "eagle" else draft
    rows = []
    for b in batches:
        for k in ks:
            mo = sd_speedup(cfg, hw, b, k, acceptance, d, context)
            de = sd_speedup(dense, hw, b, k, acceptance, d, context)
            rows.append({"batch": int(b), "k": int(k), "moe_speedup": mo["speedup"],
                         "dense_speedup": de["speedup"], "sigma": mo["sigma"],
                         "moe_target_efficiency": mo["target_efficiency"],
                         "dense_target_efficiency": de["target_efficiency"],
                         "moe_step_ms": mo["t_step_s"] * 1e3,
                         "moe_verify_ms": mo["t_verify_s"] * 1e3,
                         "dense_step_ms": de["t_step_s"] * 1e3,
                         "dense_verify_ms": de["t_verify_s"] * 1e3,
                         "draft_ms": mo["t_draft_s"] * 1e3,
                         "moe_unique_experts_verify": (expected_unique_experts(
                             cfg.moe.num_experts, cfg.moe.top_k, b * (k + 1))
                             if cfg.moe else 0.0),
                         "hardware": hw.name})
    return rows
