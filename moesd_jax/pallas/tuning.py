"""Block-size defaults for the Pallas kernels, one row per backend.

Kernels never hard-code tile sizes: they ask :func:`gather_block_sizes` (or take explicit
overrides), which starts from the per-backend row below and shrinks it to fit the problem
(F and D must be divisible by their tiles; GPU tiles must be powers of two).

Why these numbers (decode-time MoE is weight-bandwidth bound, rows per expert are few):
- ``tpu``: 32 rows per tile keeps padding low when each active expert sees ~1-30 tokens
  (it is a multiple of 16, the bf16 sublane packing); 512 F columns per weight block
  keep each (D x tile_ffn) DMA large enough to stream at HBM rate and small enough that
  gate + up + down blocks, double-buffered, fit VMEM for D up to 8192 in bf16. D is never
  tiled on TPU: the fused SwiGLU needs the whole x row for the gate/up dot.
- ``gpu`` (Triton): 16 rows is the smallest tile ``tl.dot`` accepts; 64 x 64 weight tiles
  keep register pressure low with the default 4 warps.
- ``cpu``: interpret mode only (tests); bigger tiles mean fewer interpreted grid steps.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class GatherBlockSizes:
    """Tile sizes of the expert-gather kernel.

    Attributes:
      block_rows: assignment rows per tile; every expert's group is padded to a multiple.
      block_ffn: expert-FFN (F) columns per gate/up weight block.
      block_model: model-dim (D) columns per down-projection block and per gate/up
        contraction step (GPU kernel only; the TPU kernel keeps D whole).
    """

    block_rows: int
    block_ffn: int
    block_model: int


GATHER_BLOCK_SIZES: dict[str, GatherBlockSizes] = {
    "tpu": GatherBlockSizes(block_rows=32, block_ffn=512, block_model=512),
    "gpu": GatherBlockSizes(block_rows=16, block_ffn=64, block_model=64),
    "cpu": GatherBlockSizes(block_rows=8, block_ffn=512, block_model=512),
}

# Triton's tl.dot needs every operand dimension >= 16.
GPU_MIN_TILE = 16


def _largest_pow2_divisor_at_most(n: int, cap: int) -> int:
    """Largest power of two that divides ``n`` and is <= ``cap`` (at least 1)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _fit_tpu_lanes(n: int, cap: int) -> int:
    """A tile for a lane (last) dimension of size ``n`` on TPU: a multiple of 128 dividing
    ``n`` and at most ``cap``, else the whole dimension (always a legal block)."""
    b = (min(cap, n) // 128) * 128
    while b >= 128:
        if n % b == 0:
            return b
        b -= 128
    return n


def gather_block_sizes(
    backend: str,
    *,
    d_model: int,
    d_ffn: int,
    block_rows: int | None = None,
    block_ffn: int | None = None,
    block_model: int | None = None,
) -> GatherBlockSizes:
    """Tile sizes for the expert-gather kernel on ``backend``, fitted to (D, F).

    Args:
      backend: ``"tpu"``, ``"gpu"`` or ``"cpu"`` (CPU runs the TPU kernel interpreted).
      d_model: D.
      d_ffn: F.
      block_rows, block_ffn, block_model: explicit overrides; ``None`` takes the table
        default, fitted to the problem. Explicit values are returned unchanged (the kernel
        validates them).

    Returns:
      GatherBlockSizes.
    """
    if backend not in GATHER_BLOCK_SIZES:
        raise ValueError(f"unknown backend {backend!r}; expected one of "
                         f"{sorted(GATHER_BLOCK_SIZES)}")
    base = GATHER_BLOCK_SIZES[backend]
    if backend == "gpu":
        ffn = _largest_pow2_divisor_at_most(d_ffn, base.block_ffn)
        model = _largest_pow2_divisor_at_most(d_model, base.block_model)
    else:
        ffn = _fit_tpu_lanes(d_ffn, base.block_ffn)
        model = d_model
    return GatherBlockSizes(
        block_rows=base.block_rows if block_rows is None else block_rows,
        block_ffn=ffn if block_ffn is None else block_ffn,
        block_model=model if block_model is None else block_model,
    )


def block_table_key(platform: str, interpret: bool) -> str:
    """Row of the tuning tables for a kernel platform: interpreted TPU kernels are CPU."""
    return "cpu" if (platform == "tpu" and interpret) else platform


def resolve_backend(backend: str | None, interpret: bool | None, *,
                    allow_xla: bool = False) -> tuple[str, bool, str]:
    """Map a user-facing backend to (kernel platform, interpret, tuning-table row).

    Args:
      backend: ``"tpu"``, ``"gpu"``, ``"cpu"`` (the TPU kernel interpreted), ``"xla"``
        (no kernel; only where ``allow_xla``), or None for ``jax.default_backend()``.
      interpret: force interpret mode on/off; None = interpret only for ``"cpu"``.

    Returns:
      (platform in {"tpu", "gpu", "xla"}, interpret, table row of this module).
    """
    if backend is None:
        backend = jax.default_backend()
        backend = "gpu" if backend in ("cuda", "rocm") else backend
    allowed = ("tpu", "gpu", "cpu") + (("xla",) if allow_xla else ())
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed} or None, got {backend!r}")
    if backend == "xla":
        platform, interp, _ = resolve_backend(None, interpret)
        return "xla", interp, block_table_key(platform, interp)
    platform = "tpu" if backend == "cpu" else backend
    interp = (backend == "cpu") if interpret is None else bool(interpret)
    return platform, interp, block_table_key(platform, interp)
