"""Models shared by the sharding tests, and the worker of the two-process test.

As a script, one process of a multi-process run: it joins ``jax.distributed`` on
localhost, greedy-decodes ``PROMPTS`` with the 8-expert target under a strategy spanning
every process's devices, and writes the tokens as JSON. The parent test sets XLA_FLAGS
(devices per process) in the environment; this file never touches it.

  python tests/sharding_worker.py PROCESS_ID NUM_PROCESSES PORT STRATEGY OUT.json
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moesd_jax.config import ModelConfig, MoEConfig, SpecConfig  # noqa: E402

# Heads, kv heads, ffn widths and vocab split 8 ways, so every strategy applies.
K, MAX_NEW, MAX_LEN = 2, 12, 48
PROMPTS = [[int(t) for t in np.random.default_rng(0).integers(0, 64, size=n)]
           for n in (5, 17, 9, 3, 12, 30, 7, 21)]
SPEC = SpecConfig(method="draft", k=K)


def target_cfg(experts: int) -> ModelConfig:
    """One MoE layer (with a gated shared expert) over ``experts`` experts, top-2."""
    return ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=8, num_kv_heads=8,
                       head_dim=8, mlp_dim=64, max_seq_len=MAX_LEN,
                       moe=MoEConfig(num_experts=experts, top_k=2, expert_dim=32,
                                     shared_expert_dim=32, shared_expert_gate=True))


def build_pair(experts: int):
    """(target, draft): the draft is a noisy copy, so it agrees often but not always."""
    from flax import nnx

    from moesd_jax.models.transformer import Transformer
    from tests.helpers import perturbed_copy

    target = Transformer(target_cfg(experts), nnx.Rngs(0))
    return target, perturbed_copy(target, 0.3)


@functools.cache
def reference_tokens(experts: int) -> list[list[int]]:
    """Greedy SD tokens of ``build_pair(experts)`` on one device (computed once per run,
    shared by test_sharding and test_multihost)."""
    from moesd_jax.spec.decoder import SpecDecoder

    target, draft = build_pair(experts)
    res = SpecDecoder(target, draft, SPEC, max_len=MAX_LEN).generate(PROMPTS, MAX_NEW)
    return [r.token_ids for r in res]


def main(argv: list[str]) -> int:
    pid, nproc, port, strategy, out = int(argv[0]), int(argv[1]), argv[2], argv[3], argv[4]
    from moesd_jax import distributed

    distributed.initialize_distributed(f"localhost:{port}", nproc, pid)
    import jax

    from moesd_jax.spec.decoder import SpecDecoder

    target, draft = build_pair(8)
    dec = SpecDecoder(target, draft, SPEC, max_len=MAX_LEN, mesh=strategy)
    res = dec.generate(PROMPTS, MAX_NEW)
    Path(out).write_text(json.dumps({
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "devices": jax.device_count(), "local_devices": jax.local_device_count(),
        "mesh": dict(dec.plan.mesh.shape), "primary": distributed.is_primary(),
        "tokens": [r.token_ids for r in res]}))
    distributed.sync("done")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
