#!/usr/bin/env python
"""Regenerate the golden sharding snapshots (tests/sharding_golden/<strategy>.json).

Each snapshot records, for one strategy of configs/mesh on 8 simulated CPU devices, the
mesh shape, the PartitionSpec of every parameter of a small model that uses every logical
axis (dense and MoE layers, shared expert with gate, qkv bias, q/k norm, untied head), the
KV cache spec, and that model's config, so tests/test_sharding.py can rebuild and compare.

Regenerate after an intended change to a strategy or to the model's logical axes, review
the diff, and commit it:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python scripts/dump_sharding.py [--out tests/sharding_golden] [STRATEGY ...]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moesd_jax.config import ModelConfig, MoEConfig, to_dict  # noqa: E402

GOLDEN_DEVICES = 8
# Small, but every logical axis appears and every dimension splits 8 ways.
GOLDEN_MODEL = ModelConfig(
    vocab_size=64, d_model=32, num_layers=2, num_heads=8, num_kv_heads=8, head_dim=8,
    mlp_dim=64, max_seq_len=64, qk_norm="head", qkv_bias=True,
    moe=MoEConfig(num_experts=8, top_k=2, expert_dim=32, shared_expert_dim=32,
                  shared_expert_gate=True, dense_layers=(0,)))


def snapshot(strategy: str, cfg: ModelConfig = GOLDEN_MODEL) -> dict:
    """The golden snapshot of ``strategy`` for model ``cfg`` (abstract: no weights)."""
    from flax import nnx

    from moesd_jax.models.transformer import Transformer
    from moesd_jax.sharding import ShardingPlan

    plan = ShardingPlan.load(strategy)
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    plan.param_shardings(state)  # validates divisibility
    return {**plan.describe(state), "model": to_dict(cfg)}


def to_json(obj: dict) -> str:
    """Indented JSON with every list of scalars on one line (one parameter per line)."""
    text = json.dumps(obj, indent=1, sort_keys=True)
    flat = re.compile(r"\[\s*([^\[\]{}]*?)\s*\]", re.S)
    while True:
        new = flat.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(","))
                       + "]", text)
        if new == text:
            return text + "\n"
        text = new


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("strategies", nargs="*", help="default: every configs/mesh/*.yaml")
    ap.add_argument("--out", default=str(ROOT / "tests" / "sharding_golden"))
    args = ap.parse_args(argv)

    import jax

    if jax.device_count() != GOLDEN_DEVICES:
        print(f"error: snapshots are taken on {GOLDEN_DEVICES} devices, found "
              f"{jax.device_count()}; set XLA_FLAGS=--xla_force_host_platform_device_count="
              f"{GOLDEN_DEVICES} JAX_PLATFORMS=cpu", file=sys.stderr)
        return 2
    mesh_dir = ROOT / "moesd_jax" / "configs" / "mesh"
    names = args.strategies or sorted(p.stem for p in mesh_dir.glob("*.yaml"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = out / f"{name}.json"
        path.write_text(to_json(snapshot(name)))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
