"""Lower the kernels for real accelerators from this CPU with ``jax.export``.

``platforms=["tpu"]`` runs the Pallas -> Mosaic lowering, ``platforms=["cuda"]`` the
Pallas -> Triton lowering; both catch ops that interpret mode accepts but the compilers
reject (sort, cumsum, ...). Serialization round-trips through flatbuffers. (Mosaic's and
Triton's own backend compilers only run on the device, so this is lowering-level proof.)
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

from moesd_jax.pallas import budgeted_dispatch as bd
from moesd_jax.pallas import expert_gather as eg
from moesd_jax.pallas import ops

T, K, E, D, F = 8, 2, 8, 128, 256
TRITON = "__gpu$xla.gpu.triton"
PLATFORM = {"tpu": "tpu", "gpu": "cuda"}
CHECKS = {"tpu": (), "gpu": (export.DisabledSafetyCheck.custom_call(TRITON),)}
CUSTOM_CALL = {"tpu": "tpu_custom_call", "gpu": TRITON}


def ffn_args(dtype):
    s = jax.ShapeDtypeStruct
    return (s((T, D), dtype), s((E, D, F), dtype), s((E, D, F), dtype), s((E, F, D), dtype),
            s((T, K), jnp.int32), s((T, K), jnp.float32))


def export_roundtrip(fn, args, backend):
    exp = export.export(jax.jit(fn), platforms=[PLATFORM[backend]],
                        disabled_checks=CHECKS[backend])(*args)
    text = exp.mlir_module()
    assert CUSTOM_CALL[backend] in text
    back = export.deserialize(exp.serialize())
    assert back.platforms == (PLATFORM[backend],)
    assert back.in_avals == exp.in_avals and back.out_avals == exp.out_avals
    assert back.out_tree == exp.out_tree
    return exp, text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_expert_ffn_exports(backend, dtype):
    fn = functools.partial(ops.expert_ffn, backend=backend, max_active=4)
    exp, _ = export_roundtrip(fn, ffn_args(dtype), backend)
    assert exp.out_avals[0].shape == (T, D) and exp.out_avals[0].dtype == dtype


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_expert_gather_multi_tile_exports(backend):
    """Several F tiles (TPU accumulation across the grid; GPU loops over D and F)."""
    tiles = dict(block_rows=16, block_ffn=128, block_model=64)
    fn = functools.partial(eg.expert_gather, platform=backend, **tiles)
    _, text = export_roundtrip(fn, ffn_args(jnp.bfloat16), backend)
    if backend == "gpu":  # two Triton launches: gate/up, then down
        assert text.count(TRITON) == 2


def test_triton_export_needs_the_disabled_check():
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
        export.export(jax.jit(functools.partial(ops.expert_ffn, backend="gpu")),
                      platforms=["cuda"])(*ffn_args(jnp.float32))


@pytest.mark.parametrize("policy", ["prune", "substitute"])
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_budgeted_dispatch_exports(backend, policy):
    fn = functools.partial(bd.budgeted_dispatch, top_k=K, budget=3, policy=policy,
                           norm_topk_prob=True, backend=backend, interpret=False,
                           block_rows=16)
    s = jax.ShapeDtypeStruct
    exp, _ = export_roundtrip(
        lambda p, v, r: fn(p, token_valid_T=v, root_T=r),
        (s((T, E), jnp.float32), s((T,), jnp.bool_), s((T,), jnp.bool_)), backend)
    plan = jax.tree.unflatten(exp.out_tree, list(exp.out_avals))
    assert plan.ids_TK.shape == (T, K) and plan.kept_A.shape == (3 + K,)


def test_budgeted_moe_step_exports_for_tpu():
    """Dispatch kernel -> expert-gather kernel in one program, layout passed through."""

    def step(probs, x, wg, wu, wd):
        plan = bd.budgeted_dispatch(probs, top_k=K, budget=3, policy="prune",
                                    norm_topk_prob=False, backend="tpu")
        return ops.expert_ffn(x, wg, wu, wd, plan.ids_TK, plan.combine_TK,
                              max_active=plan.max_active, backend="tpu", layout=plan.layout)

    args = (jax.ShapeDtypeStruct((T, E), jnp.float32),) + ffn_args(jnp.bfloat16)[:4]
    _, text = export_roundtrip(step, args, "tpu")
    assert text.count("tpu_custom_call") == 2

