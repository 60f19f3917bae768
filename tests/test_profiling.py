"""The loop profiler: self times, scope names, and one profiled generate call."""

import pytest

from moesd_jax.config import SpecConfig
from moesd_jax.profiling import instruction_scopes, op_scope, profile_generate, self_times
from moesd_jax.spec.decoder import SpecDecoder
from tests.helpers import build, dense_cfg, moe_cfg


def test_self_time_subtracts_nested_thunks_per_thread():
    ev = [  # a while (0-100) holding two thunks; another thread runs concurrently
        {"name": "while.1", "tid": 1, "ts": 0.0, "dur": 100.0},
        {"name": "dot.2", "tid": 1, "ts": 10.0, "dur": 30.0},
        {"name": "fusion.3", "tid": 1, "ts": 50.0, "dur": 20.0},
        {"name": "dot.4", "tid": 2, "ts": 5.0, "dur": 90.0},
        {"name": "copy.5", "tid": 1, "ts": 100.0, "dur": 7.0},  # starts as the while ends
    ]
    got = {e["name"]: us for e, us in self_times(ev)}
    assert got == {"while.1": 50.0, "dot.2": 30.0, "fusion.3": 20.0, "dot.4": 90.0,
                   "copy.5": 7.0}


def test_scopes_drop_wrappers_and_name_bare_instructions():
    line = ('  %fusion.7 = f32[5,64]{1,0} fusion(%a, %b), kind=kLoop, metadata={op_name='
            '"jit(_run)/while/body/verify/moe_dispatch/cond/branch_1_fun/dot_general"}')
    assert op_scope(line) == "verify/moe_dispatch/dot_general"
    assert op_scope(line, depth=1) == "verify"
    text = line + "\n  %dot.3 = f32[1,4096]{1,0} dot(%x, %w), lhs_contracting_dims={1}\n"
    assert instruction_scopes(text) == {"fusion.7": "verify/moe_dispatch/dot_general",
                                        "dot.3": "?dot f32[1,4096]"}


@pytest.mark.parametrize("method", ["draft", pytest.param("none", marks=pytest.mark.slow)])
def test_profile_of_a_generate_call(method):
    target = build(moe_cfg(vocab=64, layers=2, d=32, max_len=64))
    draft = build(dense_cfg(vocab=64, layers=1, d=32, max_len=64), seed=3)
    spec = SpecConfig(method="draft", k=2) if method == "draft" else SpecConfig(method="none")
    dec = SpecDecoder(target, draft if method == "draft" else None, spec, max_len=64)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    rep = profile_generate(dec, prompts, 6)
    assert rep.new_tokens == 12 and 1 <= rep.iterations <= 6
    assert 0 < rep.total_us <= 2 * rep.wall_s * 1e6  # two threads at most here
    top = rep.grouped(1)
    assert any(k == "verify" for k in top), sorted(top)
    if method == "draft":
        assert "draft" in top
    assert "ms/iteration" in rep.table() and rep.to_json()["new_tokens"] == 12
