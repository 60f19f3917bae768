"""User-facing batched generation over the compiled loop.

``SpecDecoder(target, draft, spec)`` splits the models once (``nnx.split``), builds one
jitted program per (batch, padded prompt length) shape and runs prefill plus the whole
``lax.while_loop`` as a single device call. Prompts are right-padded to a multiple of
``prompt_bucket`` so new prompts of similar length reuse the compiled program.

Two batch rules every caller (``generate``, the server engine, batch jobs) shares:

- **Seeds.** A scalar ``seed`` s gives row r its own stream, ``PRNGKey(row_seed(s, r))``
  (a 31-bit SplitMix64 hash of (s, r)), so one prompt repeated N times gives N
  independent samples. A list of seeds, one per row, is used as given: row r draws from
  ``PRNGKey(seed[r])`` whatever else is in the batch (the server's and the batch job's
  per-request ``seed``).
- **Padding.** A batch the mesh's ``batch`` axis does not divide is padded with *inert
  rows* (:func:`pad_rows`: prompt length 0 and no new tokens, so they are done before
  the first step, dispatch to no expert and add no statistics) and those rows are
  dropped from the results.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moesd_jax import sharding
from moesd_jax.config import SpecConfig
from moesd_jax.distributed import process_allgather
from moesd_jax.kv_cache import KVCache
from moesd_jax.models.transformer import Transformer
from moesd_jax.spec import budget as spec_budget
from moesd_jax.spec import utility as spec_utility
from moesd_jax.spec.loop import DecodeState, LoopConfig, generate_loop
from moesd_jax.spec.proposers import model_cfg as proposers_model_cfg
from moesd_jax.spec.tree import load_tree
from moesd_jax.spec.utility import UtilityConfig

CAPACITY_BUCKET = 128  # cache capacities are multiples of this (compiled-program reuse)
AUTO_MEMORY = 64  # --k auto: tested rows' (accepted, rejecting) counts kept per batch size


@dataclasses.dataclass
class GenerationResult:
    """New tokens of one prompt and its speculation statistics."""

    token_ids: list[int]
    stats: dict

    @property
    def mean_acceptance_length(self) -> float:
        return self.stats["mean_acceptance_length"]


_MASK64 = (1 << 64) - 1


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row`` of a call whose ``seed`` is the scalar ``seed``.

    A SplitMix64 finaliser of ``(seed mod 2**32) * 2**32 + row``, top 31 bits: distinct
    rows (and distinct scalar seeds) get unrelated streams, unlike ``seed + row``, whose
    streams overlap between calls with nearby seeds.
    """
    z = (((int(seed) & 0xFFFFFFFF) << 32) | (int(row) & 0xFFFFFFFF)) + 0x9E3779B97F4A7C15
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 33


def row_seeds(seed: int | Sequence[int], b: int) -> list[int]:
    """Per-row seeds of a batch of ``b`` rows (the rule in the module doc).

    A scalar gives ``[row_seed(seed, r) for r in range(b)]``; a sequence (one seed per
    row, each in [-2**31, 2**31)) is returned as given.
    """
    if np.isscalar(seed):
        return [row_seed(int(seed), r) for r in range(b)]
    seeds = [int(x) for x in seed]
    if len(seeds) != b:
        raise ValueError(f"seed has {len(seeds)} values for {b} prompts: give one value or "
                         "one per prompt")
    bad = [x for x in seeds if not -2**31 <= x < 2**31]
    if bad:
        raise ValueError(f"seed={bad[0]} does not fit in int32")
    return seeds


# inert row values per ``prepare`` array (prompts, prompt_len, max_new, temperature, top_k,
# top_p, seed, stop ids, oracle reference): no prompt, no new tokens, never sampled
_INERT = (0, 0, 0, 0.0, 0, 1.0, 0, -1, 0)


def pad_rows(prepared: Sequence, rows: int) -> tuple:
    """``prepare``'s arrays with inert rows appended up to ``rows`` rows.

    An inert row has prompt length 0 and ``max_new_tokens`` 0: prefill marks it done, so
    no step computes it (its tokens are masked, dispatch to no expert and add no
    statistics). Callers drop rows ``>= len(prompts)`` from the results.

    Returns:
      the arrays (host numpy where rows were added, else as given).
    """
    b = int(np.shape(prepared[0])[0])
    if rows < b:
        raise ValueError(f"cannot pad {b} rows to {rows}")
    if len(prepared) > len(_INERT):  # never drop (or wrongly pad) an argument silently
        raise ValueError(f"pad_rows knows prepare's 8 arrays and the oracle reference; got "
                         f"{len(prepared)} arguments")
    if rows == b:
        return tuple(prepared)
    out = []
    for a, fill in zip(prepared, _INERT):
        a = np.asarray(a)
        pad = np.full((rows - b,) + a.shape[1:], fill, a.dtype)
        out.append(np.concatenate([a, pad]))
    return tuple(out)


def row_stats(state: DecodeState, row: int, k: int) -> dict:
    """Per-row statistics in vLLM's terms (mean acceptance length = 1 + accepted/drafts)."""
    st = jax.tree.map(np.asarray, state.stats)
    it = int(st.iterations_B[row])
    acc = int(st.accepted_B[row])
    return {
        "iterations": it,
        "drafted": int(st.drafted_B[row]),
        "accepted": acc,
        "accepted_per_position": [int(x) for x in st.accepted_pos_BK[row][:k]],
        "draft_fed": int(st.draft_fed_B[row]),
        "mean_acceptance_length": (1.0 + acc / it) if it else 1.0,
    }


def budget_fields(tc) -> dict:
    """LoopConfig fields for a target whose MoE dispatch is ``*_budgeted``."""
    m = tc.moe
    if m is None or not m.dispatch.endswith("_budgeted"):
        return {}
    return {"prefill_dispatch": m.dispatch.removesuffix("_budgeted"),
            "budget_prune": m.budget_policy == "prune"}


class SpecDecoder:
    """Batched autoregressive / speculative generation with one compiled program per shape.

    Args:
      target: the target model.
      draft: the draft model (for ``spec.method == "draft"``), sharing the tokenizer.
      spec: speculation config (method, k, ngram_n; ``tree``: a named tree such as
        ``tree-15`` or a YAML path, filled by any proposer, see ``spec/tree.py``).
      max_len: token buffer / KV cache capacity per row (prompt + new tokens + K + 1;
        with a tree of N nodes: + N + 1). None: sized per call from the work (the
        longest prompt + max_new_tokens + K + 1, rounded up to a multiple of
        ``CAPACITY_BUCKET`` so similar calls reuse one compiled program), at most the
        model's ``max_seq_len``; never the model card's full context when the work is
        short.
      prompt_bucket: prompts are right-padded to a multiple of this.
      eos_token_ids: default stop tokens (the target's ``eos_token_ids`` if None).
      mesh: a sharding strategy (``sharding.ShardingPlan``, a ``configs/mesh`` name or a
        ``MeshConfig``): the models are copied onto its mesh, rows split per its ``batch``
        rule and MoE layers run expert-parallel when it shards experts. None: one device.

    Expert budget: ``spec.budget`` (a policy other than ``none``) budgets the target's
    verification forwards (``spec/budget.py``). The decoder runs a view of ``target``
    with the budget in its config (sharing the parameter arrays); the caller's model is
    not changed. Results then carry ``stats["budget"]`` (:func:`spec_budget.loop_stats`).
    ``spec.budget.min_agreement`` is not applied here: run :func:`spec_budget.calibrate`
    first (the CLIs do).
    """

    def __init__(self, target: Transformer, draft: Transformer | None = None,
                 spec: SpecConfig | None = None, *, max_len: int | None = None,
                 prompt_bucket: int = 16, eos_token_ids: Sequence[int] | None = None,
                 max_stop: int = 8, mesh=None):
        spec = spec or SpecConfig(method="none")
        if spec.method == "draft" and draft is None:
            raise ValueError("spec.method='draft' needs a draft model")
        if spec.method == "eagle" and draft is None:
            raise ValueError("spec.method='eagle' needs an EagleHead as draft")
        if draft is not None and draft.cfg.vocab_size != target.cfg.vocab_size:
            raise ValueError(f"draft vocab_size={draft.cfg.vocab_size} != target vocab_size="
                             f"{target.cfg.vocab_size}: they must share a tokenizer")
        if spec.budget.enabled:
            target = spec_budget.budgeted_target(target, spec.budget)
        tree, k = None, spec.k
        if spec.tree is not None and spec.method != "none":
            t = load_tree(spec.tree)
            # a chain-shaped tree is the chain: one config, one compiled program
            tree, k = (None, t.depth) if t.is_chain else (t.paths, t.num_nodes)
        self.spec = spec
        self.plan = sharding.as_plan(mesh)
        if self.plan is not None:
            target = self.plan.shard_model(target)
            draft = self.plan.shard_model(draft) if draft is not None else None
        self.target = nnx.split(target)
        self.draft = nnx.split(draft) if (draft is not None and spec.method == "draft") else None
        if spec.method == "eagle":  # (graphdef, {head state, the target's embedding})
            from moesd_jax.spec.eagle import eagle_params

            self.draft = eagle_params(draft, target)
        tc = target.cfg
        self.fixed_max_len = max_len is not None
        ucfg = None
        if spec.auto:
            spec.validate()
            ucfg = UtilityConfig(candidates=spec.candidates, test_iters=spec.auto_test_iters,
                                 set_iters=spec.auto_set_iters)
            k = ucfg.k_max
        self.cfg = LoopConfig(method=spec.method, k=k, max_len=max_len or tc.max_seq_len,
                              vocab=tc.vocab_size, ngram_n=spec.ngram_n, max_stop=max_stop,
                              num_experts=tc.moe.num_experts if tc.moe else 0, tree=tree,
                              oracle_acceptance=spec.oracle_acceptance if spec.method == "oracle"
                              else 0.0, plan=self.plan, utility=ucfg, **budget_fields(tc))
        self._costs: dict[int, np.ndarray] = {}
        # --k auto across generate calls, per batch size: recent tests' acceptance rates,
        # and the plain calls since the controller last ran
        self._auto_rates: dict[int, collections.deque] = {}
        self._auto_plain: dict[int, int] = {}
        self.prompt_bucket = prompt_bucket
        self.eos_token_ids = tuple(tc.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.trace_count = 0
        self._fn = jax.jit(self._run, static_argnums=0)

    def _run(self, cfg, target, draft, *args):
        self.trace_count += 1  # Python side effect: runs only when jax traces
        state = generate_loop(cfg, target, draft, *args)
        if self.plan is not None:  # caches (and so the loop carry) laid out per the rules
            ps = state.proposer_state
            if isinstance(ps, KVCache):
                ps = self.plan.constrain_cache(ps)
            state = state.replace(target_cache=self.plan.constrain_cache(state.target_cache),
                                  proposer_state=ps)
        return state

    def prepare(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                temperature=0.0, top_k=0, top_p=1.0, seed: int | Sequence[int] = 0,
                stop_token_ids: Sequence[int] | None = None,
                buckets: Sequence[int] | None = None) -> tuple:
        """:meth:`prepare_host`'s arrays on the default device (``prefill``'s arguments)."""
        return tuple(jnp.asarray(a) for a in self.prepare_host(
            prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids,
            buckets))

    def prepare_host(self, prompts: Sequence[Sequence[int]],
                     max_new_tokens: int | Sequence[int], temperature=0.0, top_k=0,
                     top_p=1.0, seed: int | Sequence[int] = 0,
                     stop_token_ids: Sequence[int] | None = None,
                     buckets: Sequence[int] | None = None) -> tuple[np.ndarray, ...]:
        """Validates inputs and builds the padded numpy arrays for ``prefill``.

        The one padding rule (offline generation and the server alike): prompts are
        right-padded to the smallest of ``buckets`` that holds the longest (the server's
        prefill buckets), or by default to a multiple of ``prompt_bucket``.

        ``seed``: a scalar gives row r the stream ``row_seed(seed, r)``; a list gives row r
        exactly ``seed[r]`` (see the module doc). The arrays have ``len(prompts)`` rows;
        :meth:`generate_state` pads them to the mesh when needed.
        """
        b = len(prompts)
        if b == 0:
            raise ValueError("prompts is empty")
        lens = [len(p) for p in prompts]
        for i, n in enumerate(lens):
            if n == 0:
                raise ValueError(f"prompt {i} is empty")
        def per_row(x, name):
            if np.isscalar(x):
                return [x] * b
            x = list(x)
            if len(x) != b:
                raise ValueError(f"{name} has {len(x)} values for {b} prompts: give one value "
                                 "or one per prompt")
            return x

        max_new = per_row(max_new_tokens, "max_new_tokens")
        for i, m in enumerate(max_new):
            if int(m) < 1:
                raise ValueError(f"max_new_tokens={m} (prompt {i}) must be >= 1")
        if buckets:
            p_len = next((x for x in sorted(buckets) if x >= max(lens)), None)
            if p_len is None:
                raise ValueError(f"prompt of {max(lens)} tokens exceeds the largest prefill "
                                 f"bucket {max(buckets)}")
        else:
            p_len = -(-max(lens) // self.prompt_bucket) * self.prompt_bucket
        need = max(lens[i] + int(max_new[i]) for i in range(b)) + self.cfg.k_eff + 1
        if need > self.cfg.max_len or p_len > self.cfg.max_len:
            raise ValueError(f"prompt length + max_new_tokens + k + 1 = {need} exceeds the "
                             f"cache capacity max_len={self.cfg.max_len}")
        temps = per_row(temperature, "temperature")
        if any(float(t) < 0 for t in temps):
            raise ValueError(f"temperature={temps} must be >= 0")
        tps = per_row(top_p, "top_p")
        if any(not 0.0 < float(x) <= 1.0 for x in tps):
            raise ValueError(f"top_p={tps} must be in (0, 1]")
        tks = per_row(top_k, "top_k")
        if any(int(x) < 0 for x in tks):
            raise ValueError(f"top_k={tks} must be >= 0")
        stops = list(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        if len(stops) > self.cfg.max_stop:
            raise ValueError(f"{len(stops)} stop tokens exceed max_stop={self.cfg.max_stop}")
        stop_row = stops + [-1] * (self.cfg.max_stop - len(stops))
        arr = np.zeros((b, p_len), np.int64)  # int64 first: out-of-range ids stay visible
        for i, p in enumerate(prompts):
            try:
                arr[i, : len(p)] = p
            except (OverflowError, TypeError, ValueError):
                raise ValueError(f"prompt {i} has a token id that is not an integer in [0, "
                                 f"{self.cfg.vocab})") from None
        bad = np.argwhere((arr < 0) | (arr >= self.cfg.vocab))  # padding is 0: in range
        if len(bad):
            i, j = bad[0]
            raise ValueError(f"prompt {i} has token id {arr[i, j]} outside [0, "
                             f"{self.cfg.vocab})")
        arr = arr.astype(np.int32)
        seeds = row_seeds(seed, b)
        return (arr, np.asarray(lens, np.int32), np.asarray(max_new, np.int32),
                np.asarray(temps, np.float32), np.asarray(tks, np.int32),
                np.asarray(tps, np.float32), np.asarray(seeds, np.int32),
                np.tile(np.asarray(stop_row, np.int32), (b, 1)))

    def loop_config(self, prompt_lens: Sequence[int], max_new: Sequence[int],
                    cfg: LoopConfig | None = None) -> LoopConfig:
        """The compiled program's config for one call (``cfg``, default the decoder's):
        its cache capacity from the work (see ``max_len`` in the class doc) unless a fixed
        ``max_len`` was given."""
        cfg = cfg or self.cfg
        if self.fixed_max_len:
            return cfg
        need = max(n + int(m) for n, m in zip(prompt_lens, max_new)) + cfg.k_eff + 1
        need = max(need, -(-max(prompt_lens) // self.prompt_bucket) * self.prompt_bucket)
        cap = min(-(-need // CAPACITY_BUCKET) * CAPACITY_BUCKET, self.cfg.max_len)
        return dataclasses.replace(cfg, max_len=cap)

    def call_config(self, prompt_lens: Sequence[int], max_new: Sequence[int]) -> LoopConfig:
        """The program :meth:`generate` runs for these rows: :meth:`loop_config`, except
        that ``--k auto`` where no candidate K could pay at this batch's costs even with
        every draft accepted runs the plain decoding program itself (the controller would
        never test: same tokens, none of the auto program's per-iteration overhead), and
        so do calls while the tests' recent acceptance rates say no K would pay
        (``SpecConfig.auto_explore_every``); its cache is sized for plain decoding."""
        if self.cfg.utility is None or self._auto_choice(max_new, prompt_lens) == "auto":
            return self.loop_config(prompt_lens, max_new)
        return self.loop_config(prompt_lens, max_new, self.cfg.plain())

    def _auto_rows(self, prompts: int) -> int:
        n = self.batch_multiple  # rows as generate_state pads them under a mesh
        return -(-prompts // n) * n

    def auto_rate(self, prompts: int, upper: bool = False) -> float | None:
        """The per-draft acceptance rate recent ``--k auto`` tests measured at this batch
        size, pooled (accepted drafts / (accepted + rejecting iterations) over the last
        ``AUTO_MEMORY`` tested rows), or with ``upper`` its optimistic bound
        (``utility.rate_upper``); None before any."""
        mem = self._auto_rates.get(self._auto_rows(prompts))
        if not mem:
            return None
        s, f = np.sum(np.asarray(mem), axis=0)
        if s + f <= 0:
            return None
        return spec_utility.rate_upper(s, f) if upper else float(s / (s + f))

    def _auto_choice(self, max_new: Sequence[int], prompt_lens: Sequence[int]) -> str:
        """``never``: no candidate K could pay at this batch's costs even with every draft
        accepted; ``recent``: none would finish this static batch (one row per
        ``max_new``) sooner than plain decoding by ``SpecConfig.auto_margin`` at the
        recent tests' per-row acceptance rates, raised to their optimistic bound
        (``utility.batch_pays``), and the next exploring call is not due; else ``auto``
        (run the controller)."""
        rows = self._auto_rows(len(max_new))
        costs = self.utility_costs(rows, shape=(max(prompt_lens), max(max_new)))
        if not spec_utility.pays_at(self.cfg.utility, costs):
            return "never"
        mem = self._auto_rates.get(rows)
        every = self.spec.auto_explore_every
        if (mem and every > 0 and self._auto_plain.get(rows, 0) < every - 1
                and not spec_utility.batch_pays(self.cfg.utility, costs, list(mem), max_new,
                                                margin=self.spec.auto_margin)):
            return "recent"
        return "auto"

    @property
    def batch_multiple(self) -> int:
        """Rows of a compiled batch are a multiple of this (the mesh's ``batch`` axis)."""
        return 1 if self.plan is None else self.plan.size("batch")

    def utility_costs(self, batch: int, per_call: bool = False,
                      shape: tuple[int, int] | None = None) -> np.ndarray:
        """Iteration costs cost(K), K = 0..K_max, for ``--k auto`` at ``batch`` rows
        (``spec/utility.py``): decode iterations timed on this device the first time a
        batch size is seen (``auto_costs: measured``; inside the generate loop, or with
        ``per_call`` as separately dispatched steps, as the server runs them) or the cost
        model (``model``); cached. ``shape`` (prompt length, new tokens): the calls'
        shape to time at, the first call's (the ratios move with the context: on the
        bundled pair at batch 10, cost(1) is 1.5 at 16-token prompts and 48 new tokens,
        1.9 at 64 and 68); default (16, 48)."""
        key = (batch, per_call)
        if key not in self._costs:
            k_max = self.cfg.k
            if self.spec.auto_costs == "model":
                from moesd_jax.analysis.cost_model import model_iteration_costs, preset

                draft_cfg = (proposers_model_cfg(*self.draft) if self.cfg.method == "draft"
                             else None)
                c = model_iteration_costs(proposers_model_cfg(*self.target),
                                          preset(self.spec.auto_hardware), batch, k_max,
                                          draft_cfg)
            else:
                c = self._timed_iteration_costs(batch, per_call, shape)
            self._costs[key] = c
        return self._costs[key]

    def _timed_iteration_costs(self, batch: int, per_call: bool,
                               shape: tuple[int, int] | None = None, steps: int = 8
                               ) -> np.ndarray:
        """cost(K) from whole iterations timed on this device at ``batch`` rows, for each
        branch K of the utility program (0 = plain decoding), over the K = 0 iteration; Ks
        between branches interpolated. Whole iterations, not forwards: the drafter's
        levels, sampling, acceptance and commit are part of what speculation costs. With
        ``per_call`` each iteration is one dispatched ``loop.step`` (the server); else the
        per-iteration time inside the generate loop (two generate lengths, one program).
        Random prompts of ``shape``'s length, and its new tokens (at least ``steps``
        iterations of K_max, at most 128 tokens: the context, not the length, moves the
        ratios)."""
        import time

        from moesd_jax.spec.loop import prefill, step

        u = self.cfg.utility
        rng = np.random.default_rng(0)
        plen, new = shape or (16, 0)
        plen = max(min(plen, self.cfg.max_len // 2), 1)
        max_new = min(max(new, steps * (u.k_max + 1) + 8), 128,
                      self.cfg.max_len - plen - u.k_max - 1)
        prompts = rng.integers(1, self.cfg.vocab, (batch, plen)).tolist()
        prepared = self.prepare(prompts, max_new, stop_token_ids=[])
        base = self.loop_config([plen] * batch, [max_new] * batch)
        reps = -(-(plen + max_new + u.k_max + 2) // plen)  # covers every position read
        ref = ((jnp.asarray(np.tile(np.asarray(prompts), (1, reps))),)
               if self.cfg.method == "oracle" else ())
        times = {}
        cfgs = {k: base.plain() if k == 0 else dataclasses.replace(base, utility=None, k=k,
                                                                    tree=None)
                for k in u.branch_ks}
        if not per_call:
            times = self._loop_iteration_times(cfgs, prepared, ref)
        for k in u.branch_ks if per_call else ():
            cfg = cfgs[k]
            s = jax.jit(prefill, static_argnums=0)(cfg, self.target, self.draft, *prepared,
                                                   *ref)
            fn = jax.jit(step, static_argnums=0, donate_argnums=3)
            s = jax.block_until_ready(fn(cfg, self.target, self.draft, s))  # compile
            ts = []
            for _ in range(steps):
                t0 = time.perf_counter()
                s = jax.block_until_ready(fn(cfg, self.target, self.draft, s))
                ts.append(time.perf_counter() - t0)
            times[k] = float(np.median(ts))
        ks = sorted(times)
        t = np.interp(np.arange(u.k_max + 1), ks, [times[k] for k in ks])
        return (t / t[0]).astype(np.float32)

    def _loop_iteration_times(self, cfgs: dict, prepared: tuple, ref: tuple,
                              repeats: int = 5) -> dict:
        """Seconds per iteration of each config's generate loop: (t(all new tokens) -
        t(prefill only)) / iterations, one compiled program per config; the configs are
        timed in turn, ``repeats`` rounds (a slow spell of the machine lands on one round
        of every config, not on one config), each time the fastest round's: the noise
        here is bursts of interference that only add (with medians the bundled pair's
        cost(1) at batch 10 ranged 1.36-1.69 over 13 warm-ups)."""
        import time

        short = list(prepared)
        short[2] = jnp.ones_like(prepared[2])  # max_new 1: prefill, no iteration

        def run(cfg, args):
            return jax.block_until_ready(self._fn(cfg, self.target, self.draft, *args, *ref))

        iters = {}
        for k, cfg in cfgs.items():  # compile
            iters[k] = max(int(run(cfg, prepared).stats.verify_steps), 1)
        t_full = {k: [] for k in cfgs}
        t_pre = {k: [] for k in cfgs}
        for _ in range(repeats):
            for k, cfg in cfgs.items():
                t0 = time.perf_counter()
                run(cfg, prepared)
                t_full[k].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                run(cfg, tuple(short))
                t_pre[k].append(time.perf_counter() - t0)
        return {k: max(float(np.min(t_full[k]) - np.min(t_pre[k])), 1e-9) / iters[k]
                for k in cfgs}

    def _extra_args(self, cfg: LoopConfig, prepared: tuple, rows: int) -> tuple:
        """Trailing ``prefill`` arguments past the per-row arrays: with ``cfg.utility``,
        (oracle reference or None, no fixed per-row limits, the iteration costs, the
        recent calls' acceptance rate as the controller's prior or -1, and its weight,
        ``utility.prior_weight``)."""
        if cfg.utility is None:
            return ()
        ref = () if len(prepared) > 8 else (None,)
        rate, mem = self.auto_rate(rows), self._auto_rates.get(self._auto_rows(rows))
        weight = (spec_utility.PRIOR_ITERS if rate is None
                  else spec_utility.prior_weight(list(mem), cfg.utility.k_max))
        return ref + (None, jnp.asarray(self.utility_costs(rows)),
                      jnp.float32(-1.0 if rate is None else rate), jnp.float32(weight))

    def generate_state(self, *prepared, cfg: LoopConfig | None = None) -> DecodeState:
        """Runs prefill + the whole decode loop on ``prepare``'s arrays (one device call).

        Dispatched asynchronously (block on the result to wait). Under a mesh whose
        ``batch`` axis does not divide the rows, inert rows are appended first
        (:func:`pad_rows`): the state then has more rows than ``prepared``, the extra
        ones at the end.
        """
        cfg = cfg or self.cfg
        if self.plan is None:
            extra = self._extra_args(cfg, prepared, int(np.shape(prepared[0])[0]))
            return self._fn(cfg, self.target, self.draft, *prepared, *extra)
        n, b = self.batch_multiple, int(np.shape(prepared[0])[0])
        prepared = pad_rows(prepared, -(-b // n) * n)
        extra = self._extra_args(cfg, prepared, int(np.shape(prepared[0])[0]))
        with self.plan.activate():  # the mesh; the plan itself is cfg.plan
            return self._fn(cfg, self.target, self.draft, *self.plan.shard_batch(*prepared),
                            *extra)

    def warm_up(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Compiles (by running once) every program :meth:`generate` may run for calls
        of this shape: the decoder's own and, with ``--k auto``, its plain decoding twin
        (calls the gate sends to plain decoding run it). Nothing is remembered: no
        acceptance rates, no call counts (the iteration costs are measured if not yet)."""
        lens, new = [len(p) for p in prompts], [max_new_tokens] * len(prompts)
        prepared = self.prepare_host(prompts, max_new_tokens)
        cfgs = [self.loop_config(lens, new)]
        if self.cfg.utility is not None:
            cfgs.append(self.loop_config(lens, new, self.cfg.plain()))
            self.utility_costs(self._auto_rows(len(prompts)), shape=(max(lens), max_new_tokens))
        for cfg in cfgs:
            if self.cfg.method == "oracle" and cfg.method != "none":
                continue  # needs an oracle reference: generate's own first call compiles it
            jax.block_until_ready(self.generate_state(*prepared, cfg=cfg))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 oracle_reference: Sequence[Sequence[int]] | None = None,
                 **kwargs) -> list[GenerationResult]:
        """Generates for a batch of token-id prompts; returns results in order.

        Any number of prompts works under any mesh (padded with inert rows, see the
        module doc). ``seed`` (in ``kwargs``): a scalar gives every row its own stream, a
        list one seed per row.

        ``oracle_reference`` (``spec.method == "oracle"`` only): per prompt, the prompt
        followed by the target's greedy continuation (e.g. an AR run's output).
        """
        prepared = self.prepare_host(prompts, max_new_tokens, **kwargs)
        if (oracle_reference is not None) != (self.cfg.method == "oracle"):
            raise ValueError("oracle_reference goes with spec.method='oracle' (and only)")
        if oracle_reference is not None:
            if len(oracle_reference) != len(prompts):
                raise ValueError(f"oracle_reference has {len(oracle_reference)} rows for "
                                 f"{len(prompts)} prompts")
            m = max(len(r) for r in oracle_reference)
            ref = np.zeros((len(prompts), m), np.int32)
            for i, r in enumerate(oracle_reference):
                ref[i, :len(r)] = r
            prepared = prepared + (ref,)
        max_new = ([max_new_tokens] * len(prompts) if np.isscalar(max_new_tokens)
                   else list(max_new_tokens))
        cfg = self.call_config([len(p) for p in prompts], max_new)
        if cfg.method == "none":
            prepared = prepared[:8]  # no oracle reference
        if self.cfg.utility is not None:  # plain calls since the controller last ran
            rows = self._auto_rows(len(prompts))
            self._auto_plain[rows] = (0 if cfg.utility is not None
                                      else self._auto_plain.get(rows, 0) + 1)
        state = self.generate_state(*prepared, cfg=cfg)
        # only what the results need, read back once (rows held by other processes come
        # to every process); never the caches
        state = state.replace(target_cache=None, proposer_state=None)
        if self.plan is not None:
            state = process_allgather(state)
        state = jax.device_get(state)
        tokens = np.asarray(state.tokens_BM)
        seq_len = np.asarray(state.seq_len_B)
        if state.controller is not None:  # remember this call's tests' counts
            sf = np.asarray(state.controller.sf_B2)[:len(prompts)]
            self._auto_rates.setdefault(self._auto_rows(len(prompts)), collections.deque(
                maxlen=AUTO_MEMORY)).extend(tuple(x) for x in sf if x.sum() > 0)
        out = []
        for i, p in enumerate(prompts):
            st = row_stats(state, i, self.cfg.accept_positions)
            if self.cfg.utility is not None:  # --k auto: the row's decisions
                st["utility"] = ([] if state.controller is None
                                 else spec_utility.decisions(state.controller, i))
            if cfg.budgeted:
                bst = spec_budget.loop_stats(state.stats, i)
                if bst is not None:
                    st["budget"] = bst
            out.append(GenerationResult(tokens[i, len(p): seq_len[i]].tolist(), st))
        return out
