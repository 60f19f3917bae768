"""Expert-gather kernel (TPU kernel and GPU kernel, both interpreted on CPU) vs references.

Shapes are fixed per test so every hypothesis example reuses one compiled function;
hypothesis draws the routing: group sizes (zero-token experts included), dropped
assignments, padding tokens and partial tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesd_jax.pallas import expert_gather as eg
from moesd_jax.pallas import ops

T, K, E, D, F = 12, 2, 6, 32, 64  # M = 24 assignments
HYP = settings(max_examples=10, deadline=None)

# Per-platform tiles: the TPU kernel runs two F tiles (accumulation path) with 8-row
# tiles; the GPU kernel loops over two D and two F chunks with 16-row tiles.
TILES = {
    "tpu": dict(block_rows=8, block_ffn=32),
    "gpu": dict(block_rows=16, block_ffn=32, block_model=16),
}

expert_gather_ref = jax.jit(eg.expert_gather_ref)
expert_ffn_ref = jax.jit(ops.expert_ffn_ref)
gather_layout = jax.jit(eg.gather_layout,
                        static_argnames=("num_experts", "max_active", "block_rows"))


def tolerance(dtype) -> float:
    """Relative tolerance for a kernel fed ``dtype`` vs a float32 reference: the kernel
    casts x and the SwiGLU activations to the weight dtype before each dot."""
    return {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 3e-2}[jnp.dtype(dtype)]


def assert_close(actual, expected, dtype):
    expected = np.asarray(expected, np.float32)
    tol = tolerance(dtype)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=tol,
                               atol=tol * scale)


def make_weights(seed, dtype, e=E, d=D, f=F):
    rng = np.random.default_rng(seed)
    w = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-2]), dtype)
    return w(e, d, f), w(e, d, f), w(e, f, d)


@st.composite
def routings(draw, t=T, k=K, e=E):
    """(ids_TK, combine_TK, x_TD seed): a random subset of experts is active (possibly
    none), some assignments and some whole tokens (padding) are dropped (id == E)."""
    active = draw(st.permutations(range(e)))[: draw(st.integers(0, e))]
    choices = st.sampled_from(sorted(active) + [e]) if active else st.just(e)
    ids = np.array(draw(st.lists(choices, min_size=t * k, max_size=t * k)), np.int32)
    ids = ids.reshape(t, k)
    ids[t - draw(st.integers(0, 3)):] = e  # trailing padding tokens
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    combine = np.where(ids < e, rng.uniform(0.1, 1.0, ids.shape), 0.0).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(combine), seed


def fixed_routing(seed):
    """A deterministic routing: experts {0, 2, 3, 5} active, some drops, 2 padding tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.choice([0, 2, 3, 5, E], size=(T, K)).astype(np.int32)
    ids[-2:] = E
    combine = np.where(ids < E, rng.uniform(0.1, 1.0, ids.shape), 0.0).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(combine), seed


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@HYP
@given(routing=routings())
def test_kernel_matches_reference(platform, dtype, routing):
    ids, combine, seed = routing
    x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((T, D)), dtype)
    weights = make_weights(seed + 2, dtype)
    y = eg.expert_gather(x, *weights, ids, combine, platform=platform, interpret=True,
                         **TILES[platform])
    assert y.dtype == dtype and y.shape == (T, D)
    ref = expert_gather_ref(x, *weights, ids, combine)
    assert_close(y, ref, dtype)
    # Dropped tokens produce exact zeros; routed ones are nonzero (inputs are never zero).
    dropped_T = np.all(np.asarray(ids) == E, axis=1)
    assert np.all(np.asarray(y, np.float32)[dropped_T] == 0.0)
    assert np.all(np.any(np.asarray(y, np.float32)[~dropped_T] != 0.0, axis=1))


def test_tpu_kernel_under_tpu_interpreter():
    """The TPU-faithful interpreter: NaN-filled uninitialised VMEM/outputs (so a missing
    init or a read of an unused tile shows up) and two simulated cores splitting the
    "parallel" tile axis."""
    from jax.experimental.pallas import tpu as pltpu

    ids, combine, seed = fixed_routing(5)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((T, D)), jnp.float32)
    weights = make_weights(seed + 1, jnp.float32)
    y = eg.expert_gather(x, *weights, ids, combine, platform="tpu",
                         interpret=pltpu.InterpretParams(num_cores_or_threads=2),
                         **TILES["tpu"])
    assert_close(y, expert_gather_ref(x, *weights, ids, combine), jnp.float32)


def test_references_agree():
    """The per-assignment gather reference and the dense reference are independent."""
    routing = fixed_routing(11)
    ids, combine, seed = routing
    ids = ids.at[0].set(jnp.array([1, 1], jnp.int32))  # a repeated expert sums twice
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((T, D)), jnp.float32)
    weights = make_weights(seed, jnp.float32)
    np.testing.assert_allclose(expert_gather_ref(x, *weights, ids, combine),
                               expert_ffn_ref(x, *weights, ids, combine),
                               rtol=1e-5, atol=1e-5)


@HYP
@given(routing=routings(), block_rows=st.sampled_from([1, 3, 8]))
def test_layout_invariants(routing, block_rows):
    ids = np.asarray(routing[0])
    lay = gather_layout(jnp.asarray(ids), num_experts=E, max_active=E,
                        block_rows=block_rows)
    slot, te = np.asarray(lay.slot_TK), np.asarray(lay.tile_expert_N)
    used = int(lay.num_used_tiles[0])
    r = lay.num_rows
    assert r == te.shape[0] * block_rows
    assert np.all(slot[ids == E] == r)
    real = slot[ids < E]
    assert len(set(real.tolist())) == real.size and np.all(real < r)
    counts = np.bincount(ids[ids < E], minlength=E)
    assert used == int(np.sum(-(-counts // block_rows)))
    # Each real row sits in a tile of its own expert, groups start on tile boundaries,
    # rows keep flat (t, k) order inside a group, and groups ascend by expert id.
    assert np.all(te[slot[ids < E] // block_rows] == ids[ids < E])
    starts = []
    for ex in range(E):
        rows = slot.reshape(-1)[ids.reshape(-1) == ex]
        if rows.size:
            assert rows[0] % block_rows == 0
            np.testing.assert_array_equal(rows, rows[0] + np.arange(rows.size))
            starts.append(rows[0])
    assert starts == sorted(starts)
    # Unused tiles repeat the last used tile's expert (no new weight fetch).
    if used:
        assert np.all(te[used:] == te[used - 1])


def test_layout_worked_example_from_docstring():
    lay = gather_layout(jnp.array([[1, 3], [1, 4]], jnp.int32), num_experts=4,
                        max_active=4, block_rows=2)
    r = lay.num_rows
    assert r == 8
    np.testing.assert_array_equal(lay.slot_TK, [[0, 2], [1, r]])
    np.testing.assert_array_equal(lay.tile_expert_N, [1, 3, 3, 3])
    np.testing.assert_array_equal(lay.num_used_tiles, [2])


def replay_weight_fetches(layout, num_ffn_tiles):
    """Replay the TPU kernel's gate-weight index map over the grid; a DMA happens when
    the block index changes between consecutive steps (Pallas pipelining)."""
    te, nu = np.asarray(layout.tile_expert_N), np.asarray(layout.num_used_tiles)
    fetched, prev = [], None
    for i in range(layout.num_tiles):
        for j in range(num_ffn_tiles):
            idx = tuple(int(v) for v in eg._w_in_block_index(
                i, j, te, nu, num_ffn_tiles=num_ffn_tiles))
            if idx != prev:
                fetched.append(idx)
                prev = idx
    return fetched


def test_weight_dma_only_for_active_experts():
    ids = jnp.array([[4, 1], [1, 6], [4, 6], [1, 1], [6, 6]], jnp.int32)  # 6 == dropped
    lay = eg.gather_layout(ids, num_experts=6, max_active=6, block_rows=2)
    used = int(lay.num_used_tiles[0])
    assert used == 3  # expert 1: 4 rows -> 2 tiles, expert 4: 2 rows -> 1 tile
    assert lay.num_tiles > used  # the grid has idle tiles that must fetch nothing
    fetched = replay_weight_fetches(lay, num_ffn_tiles=2)
    assert {f[0] for f in fetched} == {1, 4}
    assert len(fetched) == used * 2
    # With one F tile, consecutive tiles of one expert reuse the resident block.
    assert len(replay_weight_fetches(lay, num_ffn_tiles=1)) == 2


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_tight_active_cap(platform):
    """max_active == the number of active experts fits every group exactly."""
    rng = np.random.default_rng(7)
    ids = jnp.asarray(rng.choice([0, 2, 5], size=(T, K)).astype(np.int32))
    combine = jnp.asarray(rng.uniform(0.1, 1.0, (T, K)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    weights = make_weights(8, jnp.float32)
    y = eg.expert_gather(x, *weights, ids, combine, max_active=3, platform=platform,
                         interpret=True, **TILES[platform])
    assert_close(y, expert_gather_ref(x, *weights, ids, combine), jnp.float32)


def test_cap_overflow_drops_highest_expert_groups():
    """Documented behaviour when max_active is too small: the row buffer has
    N = (M + A*(b-1)) // b tiles; groups past it (highest expert ids) contribute 0."""
    ids = jnp.asarray(np.repeat(np.arange(E, dtype=np.int32), 4).reshape(T, K))
    rng = np.random.default_rng(3)
    combine = jnp.asarray(rng.uniform(0.1, 1.0, (T, K)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    weights = make_weights(4, jnp.float32)
    # 6 groups of 4 rows need 6 tiles of 8; A=2 gives (24 + 14) // 8 = 4 tiles.
    y = eg.expert_gather(x, *weights, ids, combine, max_active=2, platform="tpu",
                         interpret=True, **TILES["tpu"])
    expected = expert_gather_ref(x, *weights, jnp.where(ids < 4, ids, E), combine)
    assert_close(y, expected, jnp.float32)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_expert_ffn_matches_dense_reference(backend):
    routing = fixed_routing(11)
    ids, combine, seed = routing
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((T, D)), jnp.float32)
    weights = make_weights(seed + 1, jnp.float32)
    y = ops.expert_ffn(x, *weights, ids, combine, backend=backend, interpret=True)
    assert_close(y, expert_ffn_ref(x, *weights, ids, combine), jnp.float32)


def test_mixed_precision_f32_tokens_bf16_weights():
    ids, combine, seed = fixed_routing(11)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((T, D)), jnp.float32)
    weights = make_weights(seed + 1, jnp.bfloat16)
    y = eg.expert_gather(x, *weights, ids, combine, platform="tpu", interpret=True,
                         **TILES["tpu"])
    assert y.dtype == jnp.float32
    assert_close(y, expert_gather_ref(x, *weights, ids, combine), jnp.bfloat16)


def _args(t=T, d=D, f=F, e=E, k=K, dtype=jnp.float32):
    return (jnp.ones((t, d), dtype), jnp.ones((e, d, f), dtype), jnp.ones((e, d, f), dtype),
            jnp.ones((e, f, d), dtype), jnp.zeros((t, k), jnp.int32),
            jnp.ones((t, k), jnp.float32))


@pytest.mark.parametrize("mutate, kwargs, match", [
    (lambda a: (a[0][:, :-1],) + a[1:], {}, r"w_gate_EDF must be \[E, D=31, F\]"),
    (lambda a: a[:2] + (a[2][:, :, :-1],) + a[3:], {}, r"w_up_EDF must be \[E, D, F\]"),
    (lambda a: a[:3] + (a[3][:, :-1],) + a[4:], {}, r"w_down_EFD must be \[E, F, D\]"),
    (lambda a: a[:4] + (a[4][:-1],) + a[5:], {}, r"ids_TK must be \[T=12, K\]"),
    (lambda a: a[:5] + (a[5][:, :1],), {}, r"combine_TK shape \(12, 1\)"),
    (lambda a: a[:4] + (a[4].astype(jnp.float32),) + a[5:], {}, "ids_TK must be an integer"),
    (lambda a: (a[0].astype(jnp.int32),) + a[1:], {}, "x_TD dtype must be float32"),
    (lambda a: a[:3] + (a[3].astype(jnp.bfloat16),) + a[4:], {}, "must share one dtype"),
    (lambda a: a, dict(max_active=E + 1), r"max_active must be in \[1, E=6\]"),
    (lambda a: a, dict(block_ffn=48), "block_ffn=48 must divide F=64"),
    (lambda a: a, dict(block_ffn=32, interpret=False), "multiple of 128 or equal F=64"),
    (lambda a: a, dict(block_rows=12, interpret=False), "block_rows=12 must be a multiple"),
    (lambda a: a, dict(platform="gpu", block_rows=24), "block_rows=24 must be a power"),
    (lambda a: a, dict(platform="gpu", block_model=8), "block_model=8 must be a power"),
    (lambda a: a, dict(platform="cuda"), "platform must be one of"),
])
def test_validation_errors(mutate, kwargs, match):
    kwargs = dict(dict(platform="tpu", interpret=True), **kwargs)
    with pytest.raises(ValueError, match=match):
        eg.expert_gather(*mutate(_args()), **kwargs)
