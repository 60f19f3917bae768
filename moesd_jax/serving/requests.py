"""Requests, their streams, errors and the per-step policy hook of the serving engine."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

Engine = Any  # the engine (``serving/engine.py``) imports this module, never the reverse

# ---------------------------------------------------------------------------------------
# errors


class EngineError(Exception):
    """Base class of the engine's request errors."""


class RequestError(EngineError, ValueError):
    """The request is invalid (the message names the field or the limit)."""


class QueueFullError(EngineError):
    """The waiting queue holds ``max_queue`` requests already."""


class EngineClosedError(EngineError):
    """The engine is shutting down (or stopped) and admits no new requests."""


# ---------------------------------------------------------------------------------------
# requests and their streams


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters (one row of the batch).

    Attributes:
      max_tokens: new-token limit (>= 1).
      temperature: 0 = greedy.
      top_k: 0 = off. top_p: 1 = off.
      seed: per-request seed: the row samples from ``PRNGKey(seed)`` whatever else is in
        the batch (reproducible); None = a fresh random seed drawn at submission, so
        requests without a seed differ from each other.
      stop_token_ids: tokens that end the request (kept in the output); None = the
        engine's EOS ids.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None


@dataclasses.dataclass
class StreamEvent:
    """What a request's stream yields.

    ``token_ids`` are the tokens new since the previous event. The last event has
    ``finished=True``, the ``finish_reason`` (``stop``: a stop token or a caller-side
    stop; ``length``: max_tokens; ``abort``: cancelled; ``error``), all generated tokens
    in ``all_token_ids`` and the request's speculation ``stats``.
    """

    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    all_token_ids: list[int] | None = None
    stats: dict | None = None
    error: str | None = None


class RequestHandle:
    """The caller's side of a request: an (async or sync) iterator of StreamEvents.

    Created by :meth:`Engine.submit`. When submitted from a running asyncio loop the
    events are delivered into that loop (``async for ev in handle``); otherwise into a
    thread-safe queue (``for ev in handle``). :meth:`cancel` frees the slot.
    """

    def __init__(self, engine: Engine, request_id: str, prompt_ids: list[int],
                 params: SamplingParams, loop_: asyncio.AbstractEventLoop | None):
        self.engine = engine
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self._loop = loop_
        self._aq: asyncio.Queue | None = asyncio.Queue() if loop_ is not None else None
        self._q: queue.Queue | None = None if loop_ is not None else queue.Queue()
        self.finished = False
        self.cancel_reason: str | None = None
        # engine-side bookkeeping
        self.slot: int | None = None
        self.submitted_at = time.monotonic()
        self.tokens: list[int] = []
        self.prev_stats = None
        self.prefill_args: tuple | None = None  # validated, padded prefill arguments

    # engine thread -> caller
    def push(self, ev: StreamEvent) -> None:
        """Delivers one event to the caller (thread-safe; called by the engine)."""
        if self._loop is None:
            self._q.put(ev)
            return
        try:
            self._loop.call_soon_threadsafe(self._aq.put_nowait, ev)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            pass

    def cancel(self, reason: str = "abort") -> None:
        """Stops the request (idempotent); its final event carries ``reason``."""
        self.engine.cancel(self, reason)

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        if self._aq is None:
            raise TypeError("this request was submitted outside an asyncio loop: use `for`")
        while True:
            ev = await self._aq.get()
            yield ev
            if ev.finished:
                return

    def __iter__(self):
        if self._q is None:
            raise TypeError("this request was submitted inside an asyncio loop: use `async for`")
        while True:
            ev = self._q.get()
            yield ev
            if ev.finished:
                return

    def result(self, timeout: float | None = None) -> StreamEvent:
        """Blocks until the request finishes (sync handles); returns the final event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ev = self._q.get(timeout=left)
            if ev.finished:
                return ev


# ---------------------------------------------------------------------------------------
# the speculation policy hook


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the next step runs with: per-slot K (``k_B``) and a verify expert budget.

    ``k_B[i] <= LoopConfig.k`` is the number of draft tokens slot i may use; ``budget`` is
    the per-layer expert budget of the verification forward (None = unbudgeted).
    """

    k_B: np.ndarray
    budget: int | None = None


class EnginePolicy:
    """Decides, before every step, each slot's K and the verify-time expert budget.

    This is the place for a per-request K controller (Cascade: speculation utility per
    request, K=0 for rows where drafting does not pay) and for an expert-budget policy
    (MoE-Spec / the lossless budget of DESIGN.md, e.g. a tighter budget at large batch).
    The compiled step has a static K_max = ``LoopConfig.k``; a per-slot K becomes a mask
    over the K_max draft positions in the DecodeState (masked drafts must dispatch to no
    expert), and the budget a static argument choosing one of a few compiled variants.

    With ``--k auto`` (``SpecConfig.auto``) the per-slot K is decided on the device by
    the loop's utility controller (``spec/utility.py``: test/set phases, K = 0 where
    speculation loses, masked drafts dispatch to no expert) and the plan's K is ignored.
    Otherwise the engine accepts only the plan of this default policy (every active slot
    at K_max, no budget) and raises for any other. A server-wide expert budget is
    ``SpecConfig.budget`` (``spec/budget.py``), not a plan field.
    """

    def plan(self, engine: Engine, requests: Sequence[RequestHandle | None]) -> StepPlan:
        """``requests[i]`` is the request in slot i (None = free slot)."""
        k = engine.cfg.k_eff
        return StepPlan(np.array([k if r is not None else 0 for r in requests], np.int32))
