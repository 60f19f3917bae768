"""Engine internals: buckets, detokenisation with stop strings, the policy hook, queue
handling and compiled-program reuse (on the shared engine: no extra compiles)."""

from __future__ import annotations

import numpy as np
import pytest

from moesd_jax.config import SpecConfig
from moesd_jax.serving.api import _Detok
from moesd_jax.serving.engine import (
    Engine,
    EnginePolicy,
    RequestError,
    SamplingParams,
    StepPlan,
    default_buckets,
)
from moesd_jax.spec.decoder import SpecDecoder
from tests.helpers import build, dense_cfg
from tests.serving.conftest import BUCKETS, MAX_LEN, REF_MAX, SPEC


def test_default_buckets():
    assert default_buckets(128) == (16, 32, 64, 128)
    assert default_buckets(100) == (16, 32, 64, 100)
    assert default_buckets(16) == (16,)


def test_detok_holds_back_stop_prefixes_and_partial_characters(tokenizer):
    text = "def f(x):\n    return x  # caf\u00e9 END tail"
    ids = tokenizer.encode(text, add_special_tokens=False)
    for stops in ([" END"], ["x):"], ["nothing"], []):
        d = _Detok(tokenizer, stops)
        out = "".join(d.add([t]) for t in ids) + d.flush()
        cut = min([text.index(s) for s in stops if s in text], default=len(text))
        assert out == text[:cut], stops
        assert d.stopped == (cut < len(text))
        assert "\ufffd" not in out


def test_engine_queue_cancel_and_direct_use(engine, prompts, reference):
    """Sync handles: more requests than slots queue up; a cancelled waiting request
    finishes with 'abort' without running; the others match the reference."""
    n = engine.slots + 3
    hs = [engine.submit(prompts[i], SamplingParams(max_tokens=REF_MAX)) for i in range(n)]
    hs[-1].cancel()
    outs = [h.result(timeout=120) for h in hs]
    assert outs[-1].finish_reason == "abort"
    for i, ev in enumerate(outs[:-1]):
        assert ev.finish_reason == "length" and ev.all_token_ids == reference[i]
        assert ev.stats["draft_tokens"] == engine.cfg.k * ev.stats["drafts"]


def test_policy_hook_rejects_plans_the_step_cannot_run(engine, prompts):
    class PerSlotK(EnginePolicy):
        def plan(self, engine, requests):
            return StepPlan(np.zeros(len(requests), np.int32))

    saved = engine.policy
    engine.policy = PerSlotK()
    try:
        ev = engine.generate(prompts[0], SamplingParams(max_tokens=8), timeout=120)
    finally:
        engine.policy = saved
    assert ev.finish_reason == "error" and "per-slot K" in ev.error
    ev = engine.generate(prompts[0], SamplingParams(max_tokens=8), timeout=120)
    assert ev.finish_reason == "length"


def test_one_compiled_step_and_one_admit_per_bucket(engine, prompts):
    for i in (0, 9, 12):  # both buckets
        engine.generate(prompts[i], SamplingParams(max_tokens=3, temperature=0.7, seed=i))
    assert engine._step_fn._cache_size() == 1
    assert engine._admit_fn._cache_size() == len(BUCKETS)
    assert engine._retire_fn._cache_size() == 1


def test_engine_takes_a_tree_spec(models):
    """A tree spec reaches the loop config (the step itself is exercised in the slow
    test_variants.py): K = N nodes per iteration, accepted positions = tree depth."""
    target, draft = models
    eng = Engine(target, draft, SpecConfig(method="draft", k=2, tree="tree-7"), slots=1,
                 max_len=64, prefill_buckets=(32,))
    assert eng.cfg.k_eff == 7 and eng.accept_positions == 3
    assert len(eng.counters.accepted_per_pos) == 3
    with pytest.raises(RequestError, match="k \\+ 1 \\(8\\)"):
        eng.check_request([1] * 50, SamplingParams(max_tokens=8))


def test_step_loop_reads_back_only_new_tokens(engine, prompts, reference, monkeypatch):
    """Per step the engine fetches per-row lengths, flags, counters and each row's last
    D + 2 tokens, never the whole [slots, max_len] token buffer."""
    import jax

    shapes = []
    real = jax.device_get

    def spy(x):
        shapes.extend(tuple(np.shape(a)) for a in jax.tree.leaves(x))
        return real(x)

    monkeypatch.setattr(jax, "device_get", spy)
    ev = engine.submit(prompts[0], SamplingParams(max_tokens=REF_MAX)).result(timeout=120)
    assert ev.all_token_ids == reference[0]
    tail = (engine.slots, engine.cfg.accept_positions + 2)
    assert tail in shapes
    assert (engine.slots, engine.max_len) not in shapes


def test_requests_without_a_seed_differ_with_one_repeat(engine, prompts):
    """SamplingParams(seed=None) draws a random seed per request (two requests for the
    same prompt sample differently); a request's own seed reproduces its samples."""
    sampled = lambda **kw: engine.generate(  # noqa: E731
        prompts[1], SamplingParams(max_tokens=8, temperature=1.0, **kw),
        timeout=120).all_token_ids
    assert sampled() != sampled()
    assert sampled(seed=5) == sampled(seed=5)


def test_slots_not_divisible_by_the_mesh_are_padded(models):
    """dp on 8 devices with 3 slots: the compiled state has 8 rows, the 5 beyond the slots
    inert (done, never admitted); the full run is in test_variants.py (slow)."""
    target, draft = models
    eng = Engine(target, draft, SpecConfig(method="draft", k=2), slots=3, max_len=64,
                 prefill_buckets=(32,), mesh="dp")
    assert eng.slots == 3 and len(eng._running) == 3
    assert eng.state.done_B.shape == (8,) and bool(np.all(np.asarray(eng.state.done_B)))
    assert eng.state.done_B.sharding.spec == eng.plan.spec(("batch",))


def run_three(eng, prompts):
    """Starts ``eng``, runs the first three prompts to REF_MAX tokens, shuts it down;
    returns (handles, final events)."""
    eng.start(precompile=False)
    try:
        hs = [eng.submit(prompts[i], SamplingParams(max_tokens=REF_MAX)) for i in range(3)]
        return hs, [h.result(timeout=300) for h in hs]
    finally:
        eng.shutdown(drain=False)


@pytest.mark.parametrize("costs,tests", [((1.0, 1.3, 1.6), True), ((1.0, 2.2, 3.3), False)],
                         ids=["pays", "loses"])
def test_engine_k_auto_matches_reference(models, prompts, reference, costs, tests,
                                         monkeypatch):
    """--k auto in the engine: the controller runs inside the compiled step (per-slot K,
    plain decoding where drafting loses), outputs equal the reference, and each request's
    decisions come back in its stats: decisions when some K can pay at the batch's
    costs; where none can, the engine compiles the plain decoding step (no controller,
    empty decision traces). Costs are pinned (as if timed at construction) so both cases
    run whatever this machine's timing."""
    target, draft = models
    spec = SpecConfig(method="draft", k=2, auto=True, auto_candidates=(1, 2),
                      auto_set_iters=3)
    monkeypatch.setattr(SpecDecoder, "utility_costs",
                        lambda self, b, per_call=False: np.asarray(costs, np.float32))
    eng = Engine(target, draft, spec, slots=2, max_len=128, prefill_buckets=BUCKETS[:1])
    assert (eng.cfg.utility is not None) == tests and (eng.cfg.method == "none") != tests
    if tests:
        c = eng.state.controller  # the batch clock starts from the costs, not zeros
        np.testing.assert_allclose(np.asarray(c.cost_K), costs)
        assert int(c.set_len) == spec.auto_set_iters and int(c.test_k) == 2
    _, outs = run_three(eng, prompts)
    for i, ev in enumerate(outs):
        assert ev.all_token_ids == reference[i]
        assert bool(ev.stats["utility"]) == tests, ev.stats["utility"]
        assert {d["k"] for d in ev.stats["utility"]} <= {0, 1, 2}


def test_engine_routing_traces_match_generate(models, prompts, reference, tmp_path):
    """--routing-trace in the server: each finished request's trace (``[S, T, L, K]``)
    equals the one generate.py records for the same prompt alone (rows are independent),
    including a request admitted into a slot another request used before; the sink file
    is the analyze_routing format."""
    from moesd_jax.analysis import routing

    target, draft = models
    sink = routing.TraceFile(tmp_path / "t.npz", target.cfg.moe.num_experts,
                             target.cfg.moe.top_k)
    eng = Engine(target, draft, SPEC, slots=2, max_len=MAX_LEN, prefill_buckets=BUCKETS[:1],
                 routing_trace_steps=64, trace_sink=sink)
    hs, outs = run_three(eng, prompts)
    assert [ev.all_token_ids for ev in outs] == reference[:3]
    dec = SpecDecoder(target, draft, SPEC, max_len=MAX_LEN)
    want, _ = routing.record_traces(dec, prompts[:3], REF_MAX)
    got, n_exp, k = routing.load_traces(tmp_path / "t.npz")
    assert (n_exp, k) == (8, 2) and len(got) == 3
    by_id = dict(zip(sink.ids, got))
    for h, w in zip(hs, want):
        np.testing.assert_array_equal(by_id[h.request_id], w)
    with pytest.raises(ValueError, match="dense"):
        Engine(build(dense_cfg()), None, SpecConfig(method="none"), routing_trace_steps=4)
