"""Expert-gather kernel: a grouped SwiGLU FFN over only the active experts.

Legend: T tokens, D model dim, F expert ffn dim, E experts, K top-k, A active-expert cap,
M = T*K assignments, N row tiles, R = N * block_rows padded rows.

Data flow (one call)::

  ids_TK ──gather_layout──► slot_TK, tile_expert_N, num_used_tiles   (XLA, or the
                                                        budgeted-dispatch kernel)
  x_TD ──scatter rows──► x_RD (expert-sorted, each group padded to a tile multiple)
  x_RD ──kernel──► y_RD = silu(x_RD @ Wg[e]) * (x_RD @ Wu[e]) @ Wd[e]   per row tile
  y_RD ──gather slot_TK, weight by combine_TK, sum over K──► y_TD

Only tiles of *active* experts exist: at most A groups, so
N = (M + A * (block_rows - 1)) // block_rows tiles cover every padded group. The expert of
each tile and the number of used tiles are scalar-prefetched (TPU) and drive the weight
BlockSpec index maps, so an inactive expert's weights are never DMA'd. Tiles past the used
ones keep the last used block indices (Pallas skips a DMA whose block index is
unchanged) and skip their compute.

Worked example (block_rows=2, E=4, ids_TK=[[1,3],[1,4]] with 4 = dropped): experts 1 (2
rows) and 3 (1 row) are active; group 1 takes rows 0-1 (tile 0), group 3 row 2 (tile 1,
row 3 is padding): slot_TK=[[0,2],[1,R]], tile_expert_N=[1,3,3,...], num_used_tiles=[2].

Two kernels compute the same rows:
- ``tpu`` (Mosaic; also the CPU path in interpret mode): grid (N, F/block_ffn); gate, up
  and SwiGLU fused; the down projection accumulates into a resident f32 output block.
- ``gpu`` (Triton): two launches, gate/up -> h_RF, then h_RF @ Wd, because Triton has no
  scalar-prefetch index maps: the expert id is read in-kernel and the weight tile loaded
  by dynamic slicing; D and F are contracted in loops so any power-of-two tile works.

The scatter of x rows and the gather/combine of outputs stay in XLA: they move T*K*D
values, negligible next to the expert weights, and are plain XLA gathers on every backend.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from moesd_jax.pallas import tuning

PLATFORMS = ("tpu", "gpu")
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


# --------------------------------------------------------------------------- layout


def num_row_tiles(num_assignments: int, max_active: int, block_rows: int) -> int:
    """Static row-tile count N that fits M assignments in at most A tile-padded groups.

    Each group of n rows takes ceil(n / block_rows) tiles, and the sum over at most A groups
    of ceil(n_g / b) is <= (M + A * (b - 1)) / b.
    """
    return max(1, (num_assignments + max_active * (block_rows - 1)) // block_rows)


@struct.dataclass
class GatherLayout:
    """Placement of each (token, k) assignment in the expert-sorted, tile-padded buffer.

    Groups are ordered by ascending expert id; inside a group rows keep the flat (t, k)
    order; every group starts on a tile boundary.

    Attributes:
      slot_TK: int32 [T, K] row of each assignment in the [R, D] buffer; R for dropped
        assignments (id == E) and for rows past the static capacity (more active experts
        than A).
      tile_expert_N: int32 [N] the expert each row tile multiplies. Tiles past the used
        ones repeat the last used expert so no new weights are fetched.
      num_used_tiles: int32 [1] tiles holding at least one real row.
      block_rows: static rows per tile.
    """

    slot_TK: jax.Array
    tile_expert_N: jax.Array
    num_used_tiles: jax.Array
    block_rows: int = struct.field(pytree_node=False)

    @property
    def num_tiles(self) -> int:
        return self.tile_expert_N.shape[0]

    @property
    def num_rows(self) -> int:
        return self.num_tiles * self.block_rows


def register_export_serialization(cls, name: str) -> None:
    """Let ``jax.export`` serialize functions taking/returning ``cls`` (a flax struct
    dataclass whose auxdata is the tuple of its static int fields)."""
    jax.export.register_pytree_node_serialization(
        cls, serialized_name=name,
        serialize_auxdata=lambda aux: json.dumps(list(aux)).encode(),
        deserialize_auxdata=lambda b: tuple(json.loads(b)))


register_export_serialization(GatherLayout, "moesd_jax.pallas.GatherLayout")


def gather_layout(ids_TK: jax.Array, *, num_experts: int, max_active: int,
                  block_rows: int) -> GatherLayout:
    """Expert-sorted, tile-padded placement of the assignments (pure jnp, XLA).

    Args:
      ids_TK: int32 [T, K] expert ids; E (or any id outside [0, E)) means dropped.
      num_experts: E.
      max_active: A, static cap on distinct active experts (sizes the row buffer).
      block_rows: rows per tile.

    Returns:
      GatherLayout.
    """
    t, k = ids_TK.shape
    m, e, b = t * k, num_experts, block_rows
    n_tiles = num_row_tiles(m, max_active, b)
    r = n_tiles * b
    e_M = ids_TK.reshape(m).astype(jnp.int32)
    valid_M = (e_M >= 0) & (e_M < e)
    e_M = jnp.where(valid_M, e_M, e)
    counts_E = jnp.zeros((e + 1,), jnp.int32).at[e_M].add(1)[:e]
    # Rank of each assignment inside its group, in flat (t, k) order: stable sort by expert.
    order_M = jnp.argsort(e_M, stable=True)
    sorted_e_M = e_M[order_M]
    rank_sorted_M = jnp.arange(m, dtype=jnp.int32) - jnp.searchsorted(
        sorted_e_M, sorted_e_M, side="left").astype(jnp.int32)
    rank_M = jnp.zeros((m,), jnp.int32).at[order_M].set(rank_sorted_M)
    tiles_E = (counts_E + b - 1) // b
    cum_tiles_E = jnp.cumsum(tiles_E)
    first_tile_E = cum_tiles_E - tiles_E
    slot_M = first_tile_E[jnp.minimum(e_M, e - 1)] * b + rank_M
    slot_M = jnp.where(valid_M & (slot_M < r), slot_M, r)
    num_used = jnp.minimum(cum_tiles_E[-1], n_tiles)
    # Tile n belongs to the expert whose cumulative tile range covers n; tiles past the
    # used ones are clamped onto the last used tile.
    n_N = jnp.minimum(jnp.arange(n_tiles, dtype=jnp.int32), jnp.maximum(num_used - 1, 0))
    tile_expert_N = jnp.minimum(
        jnp.searchsorted(cum_tiles_E, n_N, side="right").astype(jnp.int32), e - 1)
    return GatherLayout(slot_TK=slot_M.reshape(t, k), tile_expert_N=tile_expert_N,
                        num_used_tiles=num_used.reshape(1).astype(jnp.int32),
                        block_rows=b)


# --------------------------------------------------------------------------- kernels


def _silu_f32(g):
    return g * jax.nn.sigmoid(g)


def _ffn_kernel_tpu(tile_expert_ref, num_used_ref, x_ref, wg_ref, wu_ref, wd_ref, y_ref):
    """One (row tile i, F tile f) step.

    Refs: x [block_rows, D], wg/wu [D, block_ffn], wd [block_ffn, D], y [block_rows, D] f32
    (resident across f: same block index, so it accumulates the down projection).
    """
    del tile_expert_ref  # consumed by the index maps
    i, f = pl.program_id(0), pl.program_id(1)

    @pl.when(f == 0)
    def _init():
        y_ref[...] = jnp.zeros_like(y_ref)

    @pl.when(i < num_used_ref[0])
    def _compute():
        x = x_ref[...].astype(wg_ref.dtype)
        g = jnp.dot(x, wg_ref[...], preferred_element_type=jnp.float32)
        u = jnp.dot(x, wu_ref[...], preferred_element_type=jnp.float32)
        h = (_silu_f32(g) * u).astype(wd_ref.dtype)
        y_ref[...] += jnp.dot(h, wd_ref[...], preferred_element_type=jnp.float32)


# Block index maps of the TPU kernel, grid (row tile i, F tile j). The scalar-prefetched
# tile_expert/num_used refs choose the expert, so only active experts' blocks are fetched;
# tiles past the used ones keep the last used tile's indices (Pallas skips the DMA of an
# unchanged block index). Module-level so tests can replay them over the grid.


def _x_block_index(i, j, tile_expert_ref, num_used_ref):
    return jnp.minimum(i, jnp.maximum(num_used_ref[0] - 1, 0)), 0


def _ffn_tile(i, j, num_used_ref, num_ffn_tiles):
    return jnp.where(i < num_used_ref[0], j, num_ffn_tiles - 1)


def _w_in_block_index(i, j, tile_expert_ref, num_used_ref, *, num_ffn_tiles):
    return tile_expert_ref[i], 0, _ffn_tile(i, j, num_used_ref, num_ffn_tiles)


def _w_out_block_index(i, j, tile_expert_ref, num_used_ref, *, num_ffn_tiles):
    return tile_expert_ref[i], _ffn_tile(i, j, num_used_ref, num_ffn_tiles), 0


def _grouped_ffn_tpu(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, tile_expert_N, num_used_1,
                     *, block_rows, block_ffn, interpret):
    """y_RD f32 [R, D] = SwiGLU FFN of each row with its tile's expert (Mosaic TPU)."""
    r, d = x_RD.shape
    f = w_gate_EDF.shape[2]
    n_tiles, n_f = r // block_rows, f // block_ffn

    x_map = _x_block_index
    w_in_map = functools.partial(_w_in_block_index, num_ffn_tiles=n_f)
    w_out_map = functools.partial(_w_out_block_index, num_ffn_tiles=n_f)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(n_tiles, n_f),
        in_specs=[
            pl.BlockSpec((block_rows, d), x_map),
            pl.BlockSpec((None, d, block_ffn), w_in_map),
            pl.BlockSpec((None, d, block_ffn), w_in_map),
            pl.BlockSpec((None, block_ffn, d), w_out_map),
        ],
        out_specs=pl.BlockSpec((block_rows, d), lambda i, j, te, nu: (i, 0)),
    )
    itemsize = w_gate_EDF.dtype.itemsize
    cost = pl.CostEstimate(
        flops=6 * r * d * f,
        transcendentals=r * f,
        bytes_accessed=3 * n_tiles * d * f * itemsize + r * d * (x_RD.dtype.itemsize + 4),
    )
    return pl.pallas_call(
        _ffn_kernel_tpu,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((r, d), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="expert_gather_ffn",
    )(tile_expert_N, num_used_1, x_RD, w_gate_EDF, w_up_EDF, w_down_EFD)


def _gate_up_kernel_gpu(tile_expert_ref, num_used_ref, x_ref, wg_ref, wu_ref, h_ref, *,
                        block_rows, block_ffn, block_model, d_model):
    """h[rows(i), cols(j)] = silu(x @ Wg[e]) * (x @ Wu[e]) for row tile i, F tile j.

    Refs are whole arrays: x [R, D], wg/wu [E, D, F], h [R, F].
    """
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(i < num_used_ref[0])
    def _compute():
        e = tile_expert_ref[i]
        rows = pl.ds(i * block_rows, block_rows)
        cols = pl.ds(j * block_ffn, block_ffn)

        def body(c, carry):
            g, u = carry
            dd = pl.ds(c * block_model, block_model)
            x = x_ref[rows, dd].astype(wg_ref.dtype)
            g += jnp.dot(x, wg_ref[e, dd, cols], preferred_element_type=jnp.float32)
            u += jnp.dot(x, wu_ref[e, dd, cols], preferred_element_type=jnp.float32)
            return g, u

        zeros = jnp.zeros((block_rows, block_ffn), jnp.float32)
        g, u = jax.lax.fori_loop(0, d_model // block_model, body, (zeros, zeros))
        h_ref[rows, cols] = (_silu_f32(g) * u).astype(h_ref.dtype)


def _down_kernel_gpu(tile_expert_ref, num_used_ref, h_ref, wd_ref, y_ref, *,
                     block_rows, block_ffn, block_model, d_ffn):
    """y[rows(i), cols(j)] = h @ Wd[e] for row tile i, D tile j (f32 accumulation).

    Refs are whole arrays: h [R, F], wd [E, F, D], y [R, D] f32.
    """
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(i < num_used_ref[0])
    def _compute():
        e = tile_expert_ref[i]
        rows = pl.ds(i * block_rows, block_rows)
        cols = pl.ds(j * block_model, block_model)

        def body(c, acc):
            ff = pl.ds(c * block_ffn, block_ffn)
            return acc + jnp.dot(h_ref[rows, ff], wd_ref[e, ff, cols],
                                 preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, d_ffn // block_ffn, body,
                                jnp.zeros((block_rows, block_model), jnp.float32))
        y_ref[rows, cols] = acc


def _grouped_ffn_gpu(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, tile_expert_N, num_used_1,
                     *, block_rows, block_ffn, block_model, interpret):
    """y_RD f32 [R, D], same contract as :func:`_grouped_ffn_tpu` (Triton)."""
    r, d = x_RD.shape
    f = w_gate_EDF.shape[2]
    n_tiles = r // block_rows
    params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    tiles = dict(block_rows=block_rows, block_ffn=block_ffn, block_model=block_model)
    h_RF = pl.pallas_call(
        functools.partial(_gate_up_kernel_gpu, d_model=d, **tiles),
        grid=(n_tiles, f // block_ffn),
        out_shape=jax.ShapeDtypeStruct((r, f), w_down_EFD.dtype),
        compiler_params=params,
        interpret=interpret,
        name="expert_gather_gate_up",
    )(tile_expert_N, num_used_1, x_RD, w_gate_EDF, w_up_EDF)
    return pl.pallas_call(
        functools.partial(_down_kernel_gpu, d_ffn=f, **tiles),
        grid=(n_tiles, d // block_model),
        out_shape=jax.ShapeDtypeStruct((r, d), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="expert_gather_down",
    )(tile_expert_N, num_used_1, h_RF, w_down_EFD)


# --------------------------------------------------------------------------- wrapper


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _validate_inputs(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK, *,
                     max_active):
    """Raise ValueError naming the offending shapes/dtypes."""
    if x_TD.ndim != 2:
        raise ValueError(f"x_TD must be [T, D], got shape {x_TD.shape}")
    t, d = x_TD.shape
    if w_gate_EDF.ndim != 3 or w_gate_EDF.shape[1] != d:
        raise ValueError(f"w_gate_EDF must be [E, D={d}, F], got shape {w_gate_EDF.shape}")
    e, _, f = w_gate_EDF.shape
    if w_up_EDF.shape != (e, d, f):
        raise ValueError(f"w_up_EDF must be [E, D, F] = {(e, d, f)}, got {w_up_EDF.shape}")
    if w_down_EFD.shape != (e, f, d):
        raise ValueError(
            f"w_down_EFD must be [E, F, D] = {(e, f, d)}, got {w_down_EFD.shape}")
    if ids_TK.ndim != 2 or ids_TK.shape[0] != t:
        raise ValueError(f"ids_TK must be [T={t}, K], got shape {ids_TK.shape}")
    if combine_TK.shape != ids_TK.shape:
        raise ValueError(
            f"combine_TK shape {combine_TK.shape} must equal ids_TK shape {ids_TK.shape}")
    if not jnp.issubdtype(ids_TK.dtype, jnp.integer):
        raise ValueError(f"ids_TK must be an integer array, got dtype {ids_TK.dtype}")
    if not jnp.issubdtype(combine_TK.dtype, jnp.floating):
        raise ValueError(f"combine_TK must be floating, got dtype {combine_TK.dtype}")
    if jnp.dtype(x_TD.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"x_TD dtype must be float32 or bfloat16, got {x_TD.dtype}")
    w_dtypes = [jnp.dtype(w.dtype) for w in (w_gate_EDF, w_up_EDF, w_down_EFD)]
    if len(set(w_dtypes)) != 1 or w_dtypes[0] not in _FLOAT_DTYPES:
        raise ValueError("w_gate_EDF, w_up_EDF, w_down_EFD must share one dtype, float32 or "
                         f"bfloat16; got {[str(dt) for dt in w_dtypes]}")
    if max_active is not None and not 1 <= max_active <= e:
        raise ValueError(f"max_active must be in [1, E={e}], got {max_active}")


def _validate_block_sizes(sizes, *, d, f, platform, interpret):
    """Raise ValueError naming tiles the platform cannot use for (D, F)."""
    b, bf, bd = sizes.block_rows, sizes.block_ffn, sizes.block_model
    if b < 1:
        raise ValueError(f"block_rows={b} must be >= 1")
    if f % bf:
        raise ValueError(f"block_ffn={bf} must divide F={f}")
    if platform == "tpu" and not interpret:
        # Mosaic tiling: (8, 128) for 32-bit data. Interpret mode accepts any tiles,
        # which lets CPU tests cover multi-tile F with small F.
        if b % 8:
            raise ValueError(f"block_rows={b} must be a multiple of 8 on TPU")
        if bf != f and bf % 128:
            raise ValueError(f"block_ffn={bf} must be a multiple of 128 or equal F={f} on TPU")
    elif platform == "gpu":
        if d % bd:
            raise ValueError(f"block_model={bd} must divide D={d}")
        for name, v in (("block_rows", b), ("block_ffn", bf), ("block_model", bd)):
            if not _is_pow2(v) or v < tuning.GPU_MIN_TILE:
                raise ValueError(f"{name}={v} must be a power of two >= "
                                 f"{tuning.GPU_MIN_TILE} on GPU (Triton)")


def _resolve_sizes(platform, interpret, d, f, block_rows, block_ffn, block_model, layout):
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    if layout is not None:
        if block_rows is not None and block_rows != layout.block_rows:
            raise ValueError(f"block_rows={block_rows} disagrees with the given layout's "
                             f"block_rows={layout.block_rows}")
        block_rows = layout.block_rows
    table = tuning.block_table_key(platform, interpret)
    return tuning.gather_block_sizes(table, d_model=d, d_ffn=f, block_rows=block_rows,
                                     block_ffn=block_ffn, block_model=block_model)


@functools.partial(
    jax.jit,
    static_argnames=("max_active", "platform", "block_rows", "block_ffn", "block_model",
                     "interpret"))
def expert_gather(
    x_TD: jax.Array,
    w_gate_EDF: jax.Array,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
    ids_TK: jax.Array,
    combine_TK: jax.Array,
    layout: GatherLayout | None = None,
    *,
    max_active: int | None = None,
    platform: str = "tpu",
    block_rows: int | None = None,
    block_ffn: int | None = None,
    block_model: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Routed SwiGLU experts, reading only the active experts' weights.

    y[t] = sum_k combine[t, k] * FFN_{ids[t, k]}(x[t]),
    FFN_e(x) = (silu(x @ Wg[e]) * (x @ Wu[e])) @ Wd[e].

    Args:
      x_TD: [T, D] float32 or bfloat16 tokens.
      w_gate_EDF: [E, D, F] gate projections.
      w_up_EDF: [E, D, F] up projections.
      w_down_EFD: [E, F, D] down projections (same dtype as the other weights; x is
        cast to it before each dot, accumulation is float32).
      ids_TK: int [T, K] expert ids; E means dropped (contributes 0, loads nothing).
      combine_TK: float [T, K] combine weights (0 for dropped assignments).
      layout: optional precomputed :class:`GatherLayout` for ``ids_TK`` (e.g. from the
        budgeted-dispatch kernel); computed with :func:`gather_layout` when None.
      max_active: A, static cap on distinct active experts; default min(E, T*K), which
        always suffices. With a smaller A, groups past the static row capacity (highest
        expert ids first) are silently dropped: pass an A that bounds the routing (e.g.
        the expert budget). Ignored when ``layout`` is given.
      platform: ``"tpu"`` (Mosaic kernel; CPU uses it with ``interpret=True``) or
        ``"gpu"`` (Triton kernels).
      block_rows: rows per tile (default from :mod:`moesd_jax.pallas.tuning`).
      block_ffn: F columns per weight tile (default from the tuning table). Compiled TPU
        kernels need a multiple of 128 (or F) and block_rows a multiple of 8; GPU tiles
        must be powers of two >= 16.
      block_model: D columns per tile, GPU only (default from the tuning table).
      interpret: run the Pallas kernel in interpret mode (CPU): True, or for the TPU
        kernel a ``pltpu.InterpretParams`` (the TPU-faithful interpreter: NaN-filled
        uninitialised memory, optional multi-core simulation).

    Returns:
      y_TD: [T, D] in x_TD's dtype.
    """
    _validate_inputs(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK,
                     max_active=max_active)
    t, d = x_TD.shape
    e, _, f = w_gate_EDF.shape
    k = ids_TK.shape[1]
    if max_active is None:
        max_active = min(e, t * k)
    sizes = _resolve_sizes(platform, interpret, d, f, block_rows, block_ffn, block_model,
                           layout)
    _validate_block_sizes(sizes, d=d, f=f, platform=platform, interpret=interpret)
    with jax.named_scope("expert_gather_layout"):
        if layout is None:
            layout = gather_layout(ids_TK, num_experts=e, max_active=max_active,
                                   block_rows=sizes.block_rows)
        elif layout.slot_TK.shape != ids_TK.shape:
            raise ValueError(f"layout.slot_TK shape {layout.slot_TK.shape} must equal "
                             f"ids_TK shape {ids_TK.shape}")
        r = layout.num_rows
        token_TK = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k))
        x_RD = jnp.zeros((r, d), x_TD.dtype).at[layout.slot_TK.reshape(-1)].set(
            x_TD[token_TK.reshape(-1)], mode="drop")
    with jax.named_scope("expert_gather_ffn"):
        args = (x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout.tile_expert_N,
                layout.num_used_tiles)
        if platform == "tpu":
            y_RD = _grouped_ffn_tpu(*args, block_rows=sizes.block_rows,
                                    block_ffn=sizes.block_ffn, interpret=interpret)
        else:
            y_RD = _grouped_ffn_gpu(*args, block_rows=sizes.block_rows,
                                    block_ffn=sizes.block_ffn,
                                    block_model=sizes.block_model, interpret=interpret)
    with jax.named_scope("expert_gather_combine"):
        # Dropped assignments point at row R: mode="fill" reads them as zeros.
        y_TKD = jnp.take(y_RD, layout.slot_TK, axis=0, mode="fill", fill_value=0)
        y_TD = jnp.sum(y_TKD * combine_TK.astype(jnp.float32)[:, :, None], axis=1)
    return y_TD.astype(x_TD.dtype)


# --------------------------------------------------------------------------- reference


def expert_gather_ref(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK):
    """Float32 reference: gather each assignment's expert weights, no sorting or tiling.

    Same contract as :func:`expert_gather` (dropped ids == E contribute 0). Memory is
    O(T*K*D*F): for tests only.
    """
    e = w_gate_EDF.shape[0]
    x = x_TD.astype(jnp.float32)                                     # [T, D]
    valid_TK = (ids_TK >= 0) & (ids_TK < e)                          # [T, K]
    safe_TK = jnp.where(valid_TK, ids_TK, 0)
    wg_TKDF = w_gate_EDF.astype(jnp.float32)[safe_TK]                # [T, K, D, F]
    wu_TKDF = w_up_EDF.astype(jnp.float32)[safe_TK]                  # [T, K, D, F]
    wd_TKFD = w_down_EFD.astype(jnp.float32)[safe_TK]                # [T, K, F, D]
    hp = jax.lax.Precision.HIGHEST
    g_TKF = jnp.einsum("td,tkdf->tkf", x, wg_TKDF, precision=hp)
    u_TKF = jnp.einsum("td,tkdf->tkf", x, wu_TKDF, precision=hp)
    h_TKF = jax.nn.silu(g_TKF) * u_TKF
    y_TKD = jnp.einsum("tkf,tkfd->tkd", h_TKF, wd_TKFD, precision=hp)
    w_TK = jnp.where(valid_TK, combine_TK.astype(jnp.float32), 0.0)
    return jnp.einsum("tkd,tk->td", y_TKD, w_TK, precision=hp)       # [T, D] float32
