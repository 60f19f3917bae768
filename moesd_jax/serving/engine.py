"""Slot-based continuous batching around the speculative decoding loop.

The engine owns one static-shape :class:`~moesd_jax.spec.loop.DecodeState` of ``slots``
rows. A background thread repeats:

1. cancel: rows whose request was cancelled (client gone, stop string seen) are marked
   done on the device (jitted ``retire``) and their slot is freed;
2. admit: while a slot is free and a request waits, the request's prompt is padded to a
   prompt bucket and prefilled at batch 1, and the resulting row is written into the
   slot (jitted ``admit`` = ``prefill`` + ``insert``: a dynamic-update-slice of every
   batch-axis leaf of the state, the caches' k/v on axis 1);
3. step: ONE compiled ``loop.step`` (draft -> verify -> accept -> commit) for all slots;
   done/free rows are frozen and dispatch to no expert;
4. read back the small per-row arrays (lengths, done flags, counters) and each row's
   last D + 2 tokens (never the whole token buffer) and push the new tokens of every
   request to its stream.

Every row's computation is independent of the other rows (per-row lengths, masks, keys
and sampling parameters), so a request's output does not depend on what else is in the
batch: greedy output equals :meth:`SpecDecoder.generate` for the same prompt.

Compiled programs: one ``admit`` per prompt bucket, one ``step``, one ``retire``; all are
built by :meth:`Engine.start` before the first request (and cached on disk by JAX's
persistent compilation cache when :func:`enable_compilation_cache` was called).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moesd_jax.config import SpecConfig
from moesd_jax.kv_cache import KVCache
from moesd_jax.runtime import (  # noqa: F401  (re-exported API)
    DEFAULT_CACHE_DIR,
    enable_compilation_cache,
)
from moesd_jax.serving.requests import (  # noqa: F401  (re-exported API)
    EngineClosedError,
    EngineError,
    EnginePolicy,
    QueueFullError,
    RequestError,
    RequestHandle,
    SamplingParams,
    StepPlan,
    StreamEvent,
)
from moesd_jax.serving.slots import (  # noqa: F401
    UNIQUE_EXPERT_BUCKETS,
    EngineCounters,
    default_buckets,
    insert,
    is_row_field,
    place_models,
    retire,
    token_tail,
)
from moesd_jax.spec import loop, utility
from moesd_jax.spec.decoder import SpecDecoder
from moesd_jax.spec.loop import DecodeState, Stats
from moesd_jax.spec.utility import Controller

log = logging.getLogger("moesd_jax.serving")

# ---------------------------------------------------------------------------------------
# the engine


class Engine:
    """Continuous-batching server engine over ``slots`` rows of one compiled step.

    Args:
      target: the target model; draft: the draft model (``spec.method == "draft"``).
      spec: speculation config (method, k, tree, ngram_n).
      slots: static batch B of the compiled step.
      max_len: per-row token buffer / KV cache capacity (prompt + max_tokens + k + 1 must
        fit); None = the target's ``max_seq_len``.
      max_queue: waiting requests beyond the running slots; more are rejected.
      prefill_buckets: prompt lengths the prefill is compiled for (a prompt is padded to
        the smallest bucket that holds it); None = :func:`default_buckets`.
      eos_token_ids: default stop tokens; None = the target's ``eos_token_ids``.
      policy: the per-step K policy (:class:`EnginePolicy`).
      max_stop: stop-token slots per row.
      routing_trace_steps: > 0 records each request's routing (``[S, T, L, K]`` expert ids
        of its first S verify steps, ``analysis/routing.py``) and passes it to
        ``trace_sink(request_id, trace)`` when the request finishes; 0 = no tracing (the
        compiled step is the same as without the option).
      trace_sink: where finished requests' traces go (default: appended to
        :attr:`routing_traces`, a list of ``(request_id, trace)``).
      mesh: a sharding strategy (``sharding.ShardingPlan``, a ``configs/mesh`` name or a
        MeshConfig), as for :class:`SpecDecoder`: parameters placed per its rules, slots
        split over its ``batch`` rule, MoE layers expert-parallel when it shards experts.
        When the ``batch`` axis does not divide ``slots``, the compiled state has inert
        rows beyond them (never admitted: done, no expert dispatch, no statistics).
        None = one device.

    Expert budget: ``spec.budget`` (``spec/budget.py``) budgets every verification step,
    server-wide. It is not per request: the kept experts are chosen over all rows of the
    batch's verification forward, and each B is a separately compiled step.

    Seeds: each request's row draws from ``PRNGKey(params.seed)`` (a one-row list seed in
    :meth:`SpecDecoder.prepare`'s terms), so a request with a seed samples the same
    tokens whatever else is in the batch; ``seed=None`` draws a fresh random seed.
    """

    def __init__(self, target, draft=None, spec: SpecConfig | None = None, *, slots: int = 4,
                 max_len: int | None = None, max_queue: int = 64,
                 prefill_buckets: Sequence[int] | None = None,
                 eos_token_ids: Sequence[int] | None = None,
                 policy: EnginePolicy | None = None, max_stop: int = 8, mesh=None,
                 routing_trace_steps: int = 0, trace_sink=None):
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} must be >= 0")
        # SpecDecoder builds the same LoopConfig (and validates requests the same way) as
        # offline generation: that is what makes the server's output equal generate()'s.
        self.decoder = SpecDecoder(target, draft, spec, max_len=max_len,
                                   eos_token_ids=eos_token_ids, max_stop=max_stop, mesh=mesh)
        self.cfg = self.decoder.cfg
        if routing_trace_steps < 0:
            raise ValueError(f"routing_trace_steps={routing_trace_steps} must be >= 0")
        if routing_trace_steps and not self.cfg.num_experts:
            raise ValueError("routing traces need a MoE target; this one is dense")
        if routing_trace_steps and mesh is not None:
            raise ValueError("routing traces run on one device; drop the mesh")
        if routing_trace_steps:
            self.cfg = dataclasses.replace(self.cfg, trace_steps=int(routing_trace_steps))
        self.routing_traces: list[tuple[str, np.ndarray]] = []
        self.trace_sink = trace_sink or (lambda rid, t: self.routing_traces.append((rid, t)))
        self.spec = self.decoder.spec
        self.max_len = self.cfg.max_len
        self.vocab_size = self.cfg.vocab
        self.eos_token_ids = self.decoder.eos_token_ids
        self.slots = slots
        self.max_queue = max_queue
        buckets = sorted(set(prefill_buckets or default_buckets(self.max_len)))
        if buckets[-1] > self.max_len or buckets[0] < 1:
            raise ValueError(f"prefill_buckets={buckets} must lie in [1, max_len={self.max_len}]")
        self.buckets = tuple(buckets)
        self.policy = policy or EnginePolicy()
        self.plan = getattr(self.decoder, "plan", None)
        if self.plan is None:
            self._target, self._draft, self._sharding = place_models(self.decoder.target,
                                                               self.decoder.draft)
        else:
            self._target, self._draft, self._sharding = (self.decoder.target,
                                                         self.decoder.draft, None)
        # rows of the compiled state: slots padded to the mesh's batch axis (inert rows)
        n = self.decoder.batch_multiple
        self._rows = -(-slots // n) * n
        self._state_shardings = None if self.plan is None else self._plan_shardings()
        self._num_moe_layers = int(self.cfg.num_experts and loop._num_moe_layers(*self._target))
        if self.cfg.utility is not None:  # --k auto: iteration costs at this batch size
            costs = self.decoder.utility_costs(self._rows, per_call=True)
            log.info("utility-driven K: iteration cost by K (vs a plain step) %s",
                     np.round(np.asarray(costs), 3).tolist())
            if not utility.pays_at(self.cfg.utility, costs):
                # no candidate K could pay even with every draft accepted: the controller
                # would never test, so compile the plain decoding step itself
                log.info("utility-driven K: no K can pay at these costs; decoding plainly")
                self.cfg = self.cfg.plain()

        cfg = self.cfg
        out = self._state_shardings  # None: follow the inputs (one device)
        self._step_fn = jax.jit(functools.partial(loop.step, cfg), donate_argnums=(2,),
                                out_shardings=out)
        self._admit_fn = jax.jit(functools.partial(self._admit_impl, cfg), donate_argnums=(2,),
                                 out_shardings=out)
        self._retire_fn = jax.jit(retire, donate_argnums=(0,), out_shardings=out)
        # new tokens per row between two read-backs: the first token from admission plus
        # one step's accepted drafts and bonus token
        self._tail_width = cfg.accept_positions + 2
        self._tail_fn = jax.jit(functools.partial(token_tail, self._tail_width))
        self.state: DecodeState = self._empty_state()

        self.lock = threading.Lock()
        self._cv = threading.Condition(self.lock)
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._cancels: list[RequestHandle] = []
        self._running: list[RequestHandle | None] = [None] * slots
        self._ids = itertools.count()
        self._accepting = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.healthy = True
        self.last_error: str | None = None
        # accepted-per-position slots: K for a chain, the depth for a tree
        self.accept_positions = int(getattr(cfg, "accept_positions", cfg.k_eff))
        self.counters = EngineCounters(k=max(self.accept_positions, 1))
        self._tok_window: collections.deque[tuple[float, int]] = collections.deque()
        self.startup_seconds: float | None = None

    # ----------------------------------------------------------------- compiled pieces
    @staticmethod
    def _admit_impl(cfg, target, draft, state, slot, *prefill_args):
        if cfg.utility is not None:  # the row's costs are unused: the batch keeps its own
            prefill_args = prefill_args[:8] + (None, None, state.controller.cost_K)
        row = loop.prefill(cfg, target, draft, *prefill_args)
        return insert(state, row, slot)

    def _ctx(self):
        """The sharding plan's context (expert-parallel MoE while jit traces), if any."""
        return self.plan.activate() if self.plan is not None else contextlib.nullcontext()

    def _state_shapes(self) -> DecodeState:
        b, p = self._rows, self.buckets[0]
        i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
        f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
        shapes = jax.eval_shape(
            functools.partial(loop.prefill, self.cfg), self._target, self._draft, i32(b, p),
            i32(b), i32(b), f32(b), i32(b), f32(b), i32(b), i32(b, self.cfg.max_stop),
            *(() if self.cfg.utility is None else (None, None, f32(self.cfg.k + 1))))
        return shapes

    def _plan_shardings(self) -> DecodeState:
        """Per-leaf NamedShardings of the state under the plan: rows over ``batch``,
        caches per ``plan.cache_shardings()``, batch totals replicated."""
        plan, shapes = self.plan, self._state_shapes()
        rows = lambda x: plan.batch_sharding(len(x.shape))
        replicated = jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec())
        out = {}
        for f in dataclasses.fields(shapes):
            x = getattr(shapes, f.name)
            if x is None:
                out[f.name] = None
            elif isinstance(x, KVCache):
                out[f.name] = plan.cache_shardings()
            elif isinstance(x, (Stats, Controller)):
                out[f.name] = x.replace(**{
                    g.name: rows(getattr(x, g.name)) if is_row_field(g.name) else replicated
                    for g in dataclasses.fields(x)})
            else:
                out[f.name] = jax.tree.map(rows, x)
        return shapes.replace(**out)

    def _empty_state(self) -> DecodeState:
        b = self._rows  # every row free (done); rows beyond the slots stay so
        shapes = self._state_shapes()
        state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        state = state.replace(done_B=jnp.ones((b,), bool),
                              stop_ids_BP=jnp.full((b, self.cfg.max_stop), -1, jnp.int32))
        if self.cfg.utility is not None:  # --k auto: iteration costs at this batch size
            costs = jnp.asarray(self.decoder.utility_costs(b, per_call=True))
            # the whole controller from its costs: the batch-wide clock (test / set phase
            # lengths, the first test's K, never testing when no K can pay) is set here,
            # once; admitted rows bring only their row fields
            state = state.replace(controller=utility.init(
                self.cfg.utility, b, costs, jnp.zeros((b,), jnp.int32)))
        if self._state_shardings is not None:
            return jax.device_put(state, self._state_shardings)
        return state if self._sharding is None else jax.device_put(state, self._sharding)

    def _row_args(self, prompt_ids: list[int], params: SamplingParams) -> tuple:
        """Validated batch-1 prefill arguments, the prompt padded to its bucket (the
        decoder's one validation and padding rule)."""
        try:
            return self.decoder.prepare(
                [prompt_ids], params.max_tokens, temperature=params.temperature,
                top_k=params.top_k, top_p=params.top_p,
                seed=[0 if params.seed is None else params.seed],
                stop_token_ids=params.stop_token_ids, buckets=self.buckets)
        except ValueError as e:
            raise RequestError(str(e)) from e

    # ----------------------------------------------------------------- public API
    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises :class:`RequestError` (naming the field or limit) for a bad request."""
        n = len(prompt_ids)
        if n == 0:
            raise RequestError("prompt is empty")
        if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
            raise RequestError(f"max_tokens={params.max_tokens} must be an integer >= 1")
        need = n + params.max_tokens + self.cfg.k_eff + 1
        if need > self.max_len or n > self.buckets[-1]:
            raise RequestError(
                f"prompt tokens ({n}) + max_tokens ({params.max_tokens}) + k + 1 "
                f"({self.cfg.k_eff + 1}) = {need} exceeds the cache capacity max_len="
                f"{self.max_len}: shorten the prompt or lower max_tokens")
        bad = [t for t in prompt_ids if not (isinstance(t, (int, np.integer))
                                             and 0 <= t < self.vocab_size)]
        if bad:
            raise RequestError(f"prompt token id {bad[0]!r} is outside [0, {self.vocab_size})")
        if params.seed is not None and not (isinstance(params.seed, (int, np.integer))
                                            and 0 <= params.seed < 2**31):
            raise RequestError(f"seed={params.seed!r} must be an integer in [0, 2**31)")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               request_id: str | None = None) -> RequestHandle:
        """Queues a request; returns its handle (stream of :class:`StreamEvent`).

        Raises:
          RequestError: invalid request (e.g. prompt + max_tokens beyond ``max_len``).
          QueueFullError: ``max_queue`` requests are waiting already.
          EngineClosedError: the engine is not running or is shutting down.
        """
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_request(prompt_ids, params)
        if params.seed is None:  # no seed: this request's own random stream
            params = dataclasses.replace(params, seed=secrets.randbelow(2**31))
        args = self._row_args(prompt_ids, params)
        try:
            loop_ = asyncio.get_running_loop()
        except RuntimeError:
            loop_ = None
        with self._cv:
            if not self._accepting:
                raise EngineClosedError("the server is shutting down or not started; "
                                        "no new requests are admitted")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full (max_queue={self.max_queue} "
                                     f"waiting, {self.slots} slots running); retry later")
            rid = request_id or f"req-{next(self._ids)}"
            h = RequestHandle(self, rid, prompt_ids, params, loop_)
            h.prefill_args = args
            self._waiting.append(h)
            self._cv.notify_all()
        return h

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 timeout: float | None = None) -> StreamEvent:
        """Synchronous convenience: submit and wait for the final event."""
        return self.submit(prompt_ids, params).result(timeout)

    def cancel(self, handle: RequestHandle, reason: str = "abort") -> None:
        with self._cv:
            if handle.finished or handle.cancel_reason is not None:
                return
            handle.cancel_reason = reason
            self._cancels.append(handle)
            self._cv.notify_all()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._running)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        now = time.monotonic()
        with self.lock:
            n = sum(c for t, c in self._tok_window if t >= now - window)
        return n / window

    # ----------------------------------------------------------------- lifecycle
    def precompile(self) -> float:
        """Compiles (and runs once) admit for every bucket, step and retire; returns s."""
        t0 = time.perf_counter()
        for bucket in self.buckets:
            n = min(bucket, self.max_len - self.cfg.k_eff - 2)
            n = max(n, 1)
            args = self._row_args([0] * n, SamplingParams(max_tokens=1))
            if args[0].shape[1] != bucket:  # a bucket no prompt can fill: skip
                continue
            with self._ctx():
                self.state = self._admit_fn(self._target, self._draft, self.state,
                                            np.int32(0), *args)
        with self._ctx():
            self.state = self._step_fn(self._target, self._draft, self.state)
            self.state = self._retire_fn(self.state, jnp.ones((self._rows,), bool))
        jax.block_until_ready(self.state)
        self.state = self._empty_state()
        return time.perf_counter() - t0

    def start(self, precompile: bool = True) -> Engine:
        """Precompiles (optional) and starts the engine thread."""
        if self._thread is not None:
            return self
        t0 = time.perf_counter()
        if precompile:
            self.precompile()
        self.startup_seconds = time.perf_counter() - t0
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="moesd-engine", daemon=True)
        self._thread.start()
        return self

    def stop_accepting(self) -> None:
        """Stops admitting new requests (submit raises EngineClosedError); in-flight and
        queued requests still finish."""
        with self._cv:
            self._accepting = False
            self._cv.notify_all()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stops the engine. ``drain``: first let queued and running requests finish
        (up to ``timeout`` s); otherwise (or after the timeout) cancel them. Returns True
        when everything in flight finished normally."""
        self.stop_accepting()
        drained = True
        if drain:
            drained = self.wait_idle(timeout)
        with self._cv:
            for h in list(self._waiting) + [r for r in self._running if r is not None]:
                if h.cancel_reason is None:
                    h.cancel_reason = "abort"
                    self._cancels.append(h)
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        return drained

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Waits until no request is queued or running; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._waiting or any(r is not None for r in self._running):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(0.05 if left is None else min(left, 0.05))
        return True

    # ----------------------------------------------------------------- engine thread
    def _run(self) -> None:
        while True:
            with self._cv:
                cancels, self._cancels = self._cancels, []
                stop = self._stop
            self._apply_cancels(cancels)
            if stop:
                with self._cv:
                    self._cv.notify_all()
                return
            self._admit_waiting()
            if self.num_running == 0:
                with self._cv:
                    if not self._waiting and not self._cancels and not self._stop:
                        self._cv.wait(0.1)
                continue
            try:
                self._check_plan()
                with self._ctx():
                    self.state = self._step_fn(self._target, self._draft, self.state)
                self._read_back(stepped=True)
            except Exception as e:  # noqa: BLE001 - keep serving; fail the batch
                self._fail_all(e)

    def _check_plan(self) -> None:
        plan = self.policy.plan(self, list(self._running))
        k = self.cfg.k_eff
        active = np.array([r is not None for r in self._running])
        if self.cfg.utility is not None:  # --k auto: the loop's controller picks each K
            active = np.zeros_like(active)
        if np.any(plan.k_B[active] != k) or plan.budget is not None:
            raise NotImplementedError(
                "per-slot K and expert budgets are not supported by the compiled step yet "
                f"(every running slot must use K={k} and no budget)")

    def _admit_waiting(self) -> int:
        n = 0
        while True:
            with self._cv:
                free = [i for i, r in enumerate(self._running) if r is None]
                if not free or not self._waiting:
                    return n
                h = self._waiting.popleft()
                slot = free[0]
                h.slot = slot
                self._running[slot] = h
            try:
                with self._ctx():
                    self.state = self._admit_fn(self._target, self._draft, self.state,
                                                np.int32(slot), *h.prefill_args)
            except Exception as e:  # noqa: BLE001
                log.exception("prefill failed for %s", h.request_id)
                with self._cv:
                    self._running[slot] = None
                self._finish(h, "error", error=f"prefill failed: {e}")
                continue
            h.prefill_args = None
            h.prev_stats = (0, 0, 0, np.zeros(self.counters.k, np.int64))
            with self.lock:
                self.counters.prompt_tokens += len(h.prompt_ids)
            n += 1

    def _apply_cancels(self, cancels: list[RequestHandle]) -> None:
        if not cancels:
            return
        mask = np.zeros((self._rows,), bool)
        for h in cancels:
            if h.finished:
                continue
            with self._cv:
                if h in self._waiting:
                    self._waiting.remove(h)
                    waiting = True
                else:
                    waiting = False
            if waiting or h.slot is None:
                self._finish(h, h.cancel_reason or "abort")
            else:
                mask[h.slot] = True
        if mask.any():
            try:
                with self._ctx():
                    self.state = self._retire_fn(self.state, jnp.asarray(mask))
            except Exception as e:  # noqa: BLE001
                self._fail_all(e)
                return
            for slot in np.nonzero(mask)[0]:
                h = self._running[slot]
                if h is not None:
                    self._release(slot)
                    self._finish(h, h.cancel_reason or "abort")

    def _read_back(self, stepped: bool) -> None:
        """Reads the small per-row arrays and each row's last few tokens (never the whole
        token buffer) and streams the new tokens."""
        s = self.state
        st = s.stats
        with self._ctx():
            tail = self._tail_fn(s)
        tail, seq_len, plen, done, it, dr, ac, ap, uniq, vsteps = jax.device_get(
            (tail, s.seq_len_B, s.prompt_len_B, s.done_B, st.iterations_B,
             st.drafted_B, st.accepted_B, st.accepted_pos_BK, st.unique_experts_L,
             st.verify_steps))
        w = self._tail_width
        now = time.monotonic()
        new_total = 0
        finished = []
        with self.lock:
            c = self.counters
            if stepped:
                c.engine_steps += 1
                vs = int(vsteps)
                if vs > c.verify_steps:
                    c.verify_steps = vs
                    total = int(np.sum(uniq))
                    prev = getattr(self, "_uniq_total", 0)
                    self._uniq_total = total
                    if self._num_moe_layers:
                        c.observe_unique((total - prev) / self._num_moe_layers)
            for slot, h in enumerate(self._running):
                if h is None:
                    continue
                p0 = int(plen[slot]) + len(h.tokens)
                n_new = int(seq_len[slot]) - p0
                if n_new > w:  # cannot happen with one step per read-back; stay exact
                    new = np.asarray(s.tokens_BM[slot, p0:int(seq_len[slot])]).tolist()
                else:
                    new = tail[slot, w - n_new:].tolist() if n_new > 0 else []
                cur = (int(it[slot]), int(dr[slot]), int(ac[slot]), ap[slot].astype(np.int64))
                pi, pd, pa, pp = h.prev_stats
                drafts = cur[0] - pi if self.cfg.k_eff > 0 else 0
                c.num_drafts += drafts
                c.num_draft_tokens += cur[1] - pd
                c.num_accepted_tokens += cur[2] - pa
                if self.cfg.k_eff > 0:
                    for j, d in enumerate((cur[3] - pp).tolist()):
                        c.accepted_per_pos[j] += d
                h.prev_stats = cur
                h.tokens.extend(new)
                c.generation_tokens += len(new)
                new_total += len(new)
                if new:
                    h.push(StreamEvent(new))
                if bool(done[slot]):
                    finished.append(slot)
            if new_total:
                self._tok_window.append((now, new_total))
            while self._tok_window and self._tok_window[0][0] < now - 60:
                self._tok_window.popleft()
        for slot in finished:
            h = self._running[slot]
            self._release(slot)
            stops = (self.eos_token_ids if h.params.stop_token_ids is None
                     else h.params.stop_token_ids)
            reason = "stop" if h.tokens and h.tokens[-1] in stops else "length"
            if h.cancel_reason is not None:
                reason = h.cancel_reason
            self._finish(h, reason)

    def _release(self, slot: int) -> None:
        with self._cv:
            self._running[slot] = None
            self._cv.notify_all()

    def _stats(self, h: RequestHandle) -> dict:
        it, dr, ac, ap = h.prev_stats or (0, 0, 0, np.zeros(self.counters.k, np.int64))
        k, npos = self.cfg.k_eff, self.accept_positions
        return {
            "iterations": it,
            "drafts": it if k > 0 else 0,
            "draft_tokens": dr,
            "accepted_tokens": ac,
            "accepted_per_position": [int(x) for x in ap[:npos]] if k else [],
            "mean_acceptance_length": (1.0 + ac / it) if it else 1.0,
        } | ({"utility": getattr(h, "utility", [])} if self.spec.auto else {})

    def _finish(self, h: RequestHandle, reason: str, error: str | None = None) -> None:
        if h.finished:
            return
        h.finished = True
        if self.cfg.utility is not None and h.slot is not None and error is None:
            dec = utility.decisions(jax.device_get(self.state.controller), h.slot)
            h.utility = dec
            log.info("%s utility decisions (iteration, K, utility): %s", h.request_id,
                     [(d["iteration"], d["k"], round(d["utility"], 3)) for d in dec])
        if self.cfg.trace_steps and h.slot is not None and error is None:
            self.trace_sink(h.request_id, self._slot_trace(h.slot))
        with self.lock:
            self.counters.finished[reason] += 1
        h.push(StreamEvent([], finished=True, finish_reason=reason,
                            all_token_ids=list(h.tokens), stats=self._stats(h), error=error))
        with self._cv:
            self._cv.notify_all()

    def _slot_trace(self, slot: int) -> np.ndarray:
        """Row ``slot``'s routing trace ``[S, T, L, K]`` (int16, E = no expert) over its
        verify steps so far (at most ``trace_steps``)."""
        n = min(int(jax.device_get(self.state.stats.iterations_B[slot])), self.cfg.trace_steps)
        return np.asarray(jax.device_get(self.state.routing_trace[:n, slot]))

    def _fail_all(self, e: Exception) -> None:
        log.exception("engine step failed")
        self.last_error = f"{type(e).__name__}: {e}"
        running = [(i, h) for i, h in enumerate(self._running) if h is not None]
        for i, h in running:
            self._release(i)
            self._finish(h, "error", error=f"engine step failed: {self.last_error}")
        try:
            self.state = self._empty_state()
        except Exception:  # noqa: BLE001
            self.healthy = False


# ---------------------------------------------------------------------------------------
# loading


def load_engine(model: str | Path | None = None, draft: str | Path | None = None,
                spec: SpecConfig | None = None, *, slots: int = 4, max_len: int | None = None,
                max_queue: int = 64, prefill_buckets: Sequence[int] | None = None,
                mesh: str | Path | None = None, dispatch: str | None = None,
                tokenizer: str | Path | None = None,
                calibration_prompts: Sequence[str | Sequence[int]] | None = None,
                **engine_kw):
    """Loads target (+ draft) checkpoints into an (unstarted) Engine (``engine_kw``: more
    :class:`Engine` arguments, e.g. ``routing_trace_steps``).

    ``model=None`` is the bundled target (``moesd_jax/bundled/target``); ``draft=None``
    with ``spec.method == "draft"`` is the bundled draft. The tokenizer is the target
    checkpoint's, else ``tokenizer`` (a directory), else the bundled one when its
    vocabulary fits the model.

    ``spec.budget`` is the server-wide expert budget (see :class:`Engine`); with its
    ``min_agreement`` set, ``calibration_prompts`` (texts or token-id lists) calibrate it
    first (``spec.budget.calibrate``: greedy, 32 new tokens).

    Returns:
      (engine, tokenizer or None, default model name).
    """
    from moesd_jax.runtime import load_models

    spec = spec or SpecConfig()
    bundled = model is None
    lm = load_models(None if model is None else str(model),
                     None if draft is None else str(draft), spec.method, k=spec.k,
                     tree=spec.tree, dispatch=dispatch, ngram_n=spec.ngram_n, mesh=mesh,
                     spec_budget=spec.budget)
    target, draft_model, tok = lm.target, lm.draft, lm.tokenizer
    model_dir = Path(lm.target_path)
    if tokenizer is not None:
        from moesd_jax.data import load_tokenizer

        tok = load_tokenizer(tokenizer)
    if tok is None:
        try:
            from moesd_jax.data import load_tokenizer

            cand = load_tokenizer()
            if len(cand) <= target.cfg.vocab_size:
                tok = cand
        except (ImportError, OSError) as e:  # pragma: no cover
            log.warning("no tokenizer: %s", e)
    if spec.budget.min_agreement is not None:
        from moesd_jax.spec.budget import calibrate

        if not calibration_prompts:
            raise ValueError("spec.budget.min_agreement needs calibration prompts")
        ids = []
        for p in calibration_prompts:
            if isinstance(p, str):
                if tok is None:
                    raise ValueError("text calibration prompts need a tokenizer")
                p = tok.encode(p)
            ids.append(list(p))
        gate = calibrate(target, draft_model, spec, ids, 32,
                         decoder_kwargs=dict(max_len=max_len, mesh=mesh))
        log.warning("budget gate: %s B=%s agreement=%.3f (tried %s)", gate.budget.policy,
                    gate.budget.b, gate.agreement, gate.tried)
        spec = dataclasses.replace(spec, budget=gate.budget)
    eos = tuple(target.cfg.eos_token_ids)
    if not eos and tok is not None and tok.eos_token_id is not None:
        eos = (int(tok.eos_token_id),)
    engine = Engine(target, draft_model, spec, slots=slots, max_len=max_len,
                    max_queue=max_queue, prefill_buckets=prefill_buckets, eos_token_ids=eos,
                    mesh=mesh, **engine_kw)
    name = "moesd-bundled" if bundled else model_dir.resolve().name
    return engine, tok, name

