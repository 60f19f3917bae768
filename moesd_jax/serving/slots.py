"""Slot-state surgery (insert / retire rows of a batched DecodeState) and counters."""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp

from moesd_jax.kv_cache import KVCache
from moesd_jax.spec.loop import DecodeState, Stats
from moesd_jax.spec.utility import Controller

# ---------------------------------------------------------------------------------------
# state surgery (pure functions, jitted by the engine)


def _update_rows(big: jax.Array, small: jax.Array, slot: jax.Array, axis: int) -> jax.Array:
    idx = [jnp.zeros((), jnp.int32)] * big.ndim
    idx[axis] = slot.astype(jnp.int32)
    return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), idx)


def _insert_cache(big: KVCache | None, small: KVCache | None, slot) -> KVCache | None:
    if big is None:
        return None
    return KVCache(_update_rows(big.k, small.k, slot, 1), _update_rows(big.v, small.v, slot, 1),
                   _update_rows(big.lengths, small.lengths, slot, 0))


def is_row_field(name: str) -> bool:
    """Stats and controller fields named ``*_B*`` are per row; the others
    (``unique_experts_L``, ``verify_steps``, the controller's ``cost_K`` and ``iter``) are
    batch-wide and are kept."""
    return "_B" in name


def insert(state: DecodeState, row: DecodeState, slot: jax.Array) -> DecodeState:
    """Writes the batch-1 state ``row`` into row ``slot`` of ``state``.

    Every per-row leaf has its batch on axis 0, except the caches' k/v ``[L, B, S, G, Dh]``
    and the routing trace ``[S, B, T, L, K]`` (axis 1). Batch-total statistics of
    ``state`` are kept.
    """
    out = {}
    for f in dataclasses.fields(state):
        big, small = getattr(state, f.name), getattr(row, f.name)
        if isinstance(big, KVCache) or big is None:
            out[f.name] = _insert_cache(big, small, slot)
        elif f.name == "routing_trace":  # [S, B, T, L, K]: batch on axis 1
            out[f.name] = _update_rows(big, small, slot, 1)
        elif isinstance(big, (Stats, Controller)):  # batch totals / the phase clock kept
            out[f.name] = big.replace(**{
                g.name: _update_rows(getattr(big, g.name), getattr(small, g.name), slot, 0)
                for g in dataclasses.fields(big) if is_row_field(g.name)})
        else:
            out[f.name] = jax.tree.map(lambda a, b: _update_rows(a, b, slot, 0), big, small)
    return state.replace(**out)


def token_tail(width: int, state: DecodeState) -> jax.Array:
    """The last ``width`` tokens of every row's buffer, ending at ``seq_len`` ([B, width],
    left-clamped at slot 0): what the engine reads back per step instead of the whole
    ``[slots, max_len]`` buffer."""
    idx = state.seq_len_B[:, None] - width + jnp.arange(width, dtype=jnp.int32)[None, :]
    return jnp.take_along_axis(state.tokens_BM, jnp.maximum(idx, 0), axis=1)


def retire(state: DecodeState, mask_B: jax.Array) -> DecodeState:
    """Marks the rows in ``mask_B`` done: they stop computing and dispatch to no expert."""
    return state.replace(done_B=state.done_B | mask_B)


def place_models(target, draft):
    """Commits single-device parameters explicitly to their device.

    Whether arrays are committed changes the lowered program (and so the persistent
    compilation cache key): a model built in memory (uncommitted) and the same model
    restored from a checkpoint (committed) would otherwise compile twice. Parameters
    sharded over several devices are left as they are.

    Returns:
      (target, draft, the single-device sharding, or None when sharded).
    """
    devices = {d for x in jax.tree.leaves((target[1], None if draft is None else draft[1]))
               for d in x.sharding.device_set}
    if len(devices) != 1:
        return target, draft, None
    sharding = jax.sharding.SingleDeviceSharding(devices.pop())
    put = lambda m: None if m is None else (m[0], jax.device_put(m[1], sharding))
    return put(target), put(draft), sharding


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Prompt buckets: powers of two from ``smallest`` up to ``max_len`` (inclusive)."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max_len)
    return tuple(out)


# ---------------------------------------------------------------------------------------
# counters for /metrics


UNIQUE_EXPERT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclasses.dataclass
class EngineCounters:
    """Cumulative counters (vLLM's spec-decode metrics); read under ``Engine.lock``."""

    k: int
    num_drafts: int = 0  # verify steps of a row with K > 0 drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = dataclasses.field(default_factory=list)
    generation_tokens: int = 0
    prompt_tokens: int = 0
    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    verify_steps: int = 0
    engine_steps: int = 0
    # histogram of mean (over MoE layers) distinct experts per verification forward
    unique_bucket_counts: list[int] = dataclasses.field(
        default_factory=lambda: [0] * (len(UNIQUE_EXPERT_BUCKETS) + 1))
    unique_sum: float = 0.0
    unique_last: float = 0.0

    def __post_init__(self):
        if not self.accepted_per_pos:
            self.accepted_per_pos = [0] * self.k

    def observe_unique(self, x: float) -> None:
        i = next((j for j, b in enumerate(UNIQUE_EXPERT_BUCKETS) if x <= b),
                 len(UNIQUE_EXPERT_BUCKETS))
        self.unique_bucket_counts[i] += 1
        self.unique_sum += x
        self.unique_last = x
