"""Shared fixtures of the serving tests: one tiny MoE target + draft, ONE engine (compiled
once, with the persistent XLA cache in a temp dir so the serve.py subprocess test reuses
the executables), one in-process server, and one batched SpecDecoder reference run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from moesd_jax.config import SpecConfig
from moesd_jax.data import load_tokenizer
from moesd_jax.serving import engine as engine_mod
from moesd_jax.serving.api import ServerThread, create_app
from moesd_jax.spec.decoder import SpecDecoder
from tests.helpers import build, moe_cfg, perturbed_copy

MODEL = "tiny-moe"
MAX_LEN = 128
BUCKETS = (32, 128)
SPEC = SpecConfig(method="draft", k=2)
SLOTS = 4
REF_MAX = 24  # reference generation length; tests use max_tokens <= REF_MAX (greedy prefix)
TEXTS = ["def fibonacci(n):\n    ", "import os\nimport sys\n\n", "class Foo:\n    def __init__("]


def tiny_cfg():
    return moe_cfg(vocab=4096, d=32, layers=2, experts=8, top_k=2, max_len=MAX_LEN,
                   eos_token_ids=(0,))


def make_prompts(tok) -> list[list[int]]:
    """16 prompts of mixed lengths (2..80 tokens, two buckets); the last ones are TEXTS."""
    rng = np.random.default_rng(0)
    lens = [2, 5, 9, 17, 31, 33, 40, 7, 12, 60, 3, 25, 80]
    out = [rng.integers(1, 4096, size=n).tolist() for n in lens]
    out += [list(tok.encode(t, add_special_tokens=False)) for t in TEXTS]
    return out


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def models():
    target = build(tiny_cfg(), seed=0)
    draft = perturbed_copy(build(tiny_cfg(), seed=0), 0.05, seed=3)
    return target, draft


@pytest.fixture(scope="session")
def xla_cache_dir():
    """The session's persistent XLA cache (tests/conftest.py), which serve.py shares."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture(scope="session")
def engine(models, xla_cache_dir):
    target, draft = models
    eng = engine_mod.Engine(target, draft, SPEC, slots=SLOTS, max_len=MAX_LEN,
                            prefill_buckets=BUCKETS, max_queue=64)
    eng.start()
    yield eng
    eng.shutdown(drain=False)


@pytest.fixture(scope="session")
def server(engine, tokenizer):
    st = ServerThread(create_app(engine, tokenizer, MODEL)).start()
    yield st
    st.stop()


@pytest.fixture(scope="session")
def prompts(tokenizer):
    return make_prompts(tokenizer)


@pytest.fixture(scope="session")
def decoder(models):
    target, draft = models
    return SpecDecoder(target, draft, SPEC, max_len=MAX_LEN)


@pytest.fixture(scope="session")
def reference(decoder, prompts):
    """Greedy SpecDecoder.generate of all prompts in one batch (one compile)."""
    return [r.token_ids for r in decoder.generate(prompts, REF_MAX, temperature=0.0)]


@pytest.fixture(scope="session")
def sampled_reference(decoder, prompts):
    """Sampled generation (same compiled program: per-row parameters are arrays)."""
    n = len(prompts)
    res = decoder.generate(prompts, REF_MAX, temperature=[0.9] * n, top_k=[40] * n,
                           top_p=[0.95] * n, seed=list(range(100, 100 + n)))
    return [r.token_ids for r in res]


def rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
