"""Slow: the engine with a draft tree and on device meshes (8 simulated CPU devices)
reproduces SpecDecoder's greedy output. Each variant compiles its own step."""

from __future__ import annotations

import pytest

from moesd_jax.config import SpecConfig
from moesd_jax.serving.engine import Engine, SamplingParams
from moesd_jax.spec.decoder import SpecDecoder
from tests.serving.conftest import MAX_LEN, SPEC

pytestmark = pytest.mark.slow


def _engine_outputs(eng, prompts, m):
    eng.start()
    try:
        hs = [eng.submit(p, SamplingParams(max_tokens=m)) for p in prompts]
        return [h.result(timeout=600) for h in hs]
    finally:
        eng.shutdown(drain=False)


def test_tree_engine_equals_tree_decoder(models, prompts):
    target, draft = models
    spec = SpecConfig(method="draft", k=2, tree="tree-7")
    ps = prompts[:6]
    ref = SpecDecoder(target, draft, spec, max_len=MAX_LEN).generate(ps, 16)
    outs = _engine_outputs(Engine(target, draft, spec, slots=4, max_len=MAX_LEN,
                                  prefill_buckets=(128,)), ps, 16)
    for r, ev in zip(ref, outs):
        assert ev.all_token_ids == r.token_ids
        assert ev.stats["accepted_per_position"] == r.stats["accepted_per_position"]


@pytest.mark.parametrize("mesh,slots", [("dp", 8), ("ep", 4), ("dp", 3), ("fsdp_ep", 3)])
def test_mesh_engine_equals_single_device(models, prompts, reference, mesh, slots):
    target, draft = models
    ps = prompts[:6]
    outs = _engine_outputs(Engine(target, draft, SPEC, slots=slots, max_len=MAX_LEN,
                                  prefill_buckets=(128,), mesh=mesh), ps, 16)
    for i, ev in enumerate(outs):
        assert ev.all_token_ids == reference[i][:16], (mesh, i)
