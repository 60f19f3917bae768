"""The bundled target/draft pair: loadable offline, within spec, and as good as recorded.

``moesd_jax/bundled/metrics.json`` is written by ``python scripts/eval_bundled.py
--write-metrics`` (its ``command`` field); the held-out loss on the fixed 16 windows of
256 tokens must reproduce within ``TOL`` nats.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesd_jax.checkpoint import BUNDLED_ROOT, bundled_model_dir, load_model

TOL = 0.05
SEQ_LEN = 256
WINDOWS = 16
MAX_BUNDLE_BYTES = 40 * 1024 * 1024


@pytest.fixture(scope="module")
def metrics():
    f = BUNDLED_ROOT / "metrics.json"
    assert f.is_file(), f"{f} missing: run scripts/eval_bundled.py --write-metrics"
    return json.loads(f.read_text())


@pytest.fixture(scope="module")
def pair():
    target, ttok = load_model(bundled_model_dir("target"))
    draft, dtok = load_model(bundled_model_dir("draft"))
    return target, ttok, draft, dtok


@pytest.fixture(scope="module")
def heldout(pair):
    from moesd_jax.data import encode_corpus, read_corpus

    return encode_corpus(pair[1], read_corpus("heldout"), progress=False)


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def test_bundle_within_spec(pair):
    from moesd_jax.train import count_params

    target, ttok, draft, dtok = pair
    assert ttok is not None and dtok is not None, "tokenizer must be bundled with both"
    assert draft.cfg.vocab_size == target.cfg.vocab_size == len(ttok) == len(dtok)
    assert ttok.get_vocab() == dtok.get_vocab()
    m = target.cfg.moe
    assert m is not None and m.num_experts >= 16 and m.top_k >= 2
    assert draft.cfg.moe is None
    tc, dc = count_params(target.cfg), count_params(draft.cfg)
    assert tc["total"] <= 30_000_000
    assert dc["active"] * 4 <= tc["active"], (dc, tc)
    size = _dir_bytes(bundled_model_dir("target")) + _dir_bytes(bundled_model_dir("draft"))
    assert size <= MAX_BUNDLE_BYTES, size


@pytest.mark.parametrize("which", ["target", "draft"])
def test_heldout_loss_matches_record(pair, heldout, metrics, which):
    from moesd_jax.train import evaluate

    model = pair[0] if which == "target" else pair[2]
    rec = metrics[which]["heldout_fixed"]
    assert rec["seq_len"] == SEQ_LEN and rec["windows"] == WINDOWS
    got = evaluate(model, heldout, SEQ_LEN, WINDOWS)
    assert got["windows"] == WINDOWS
    assert np.isfinite(got["loss"])
    assert abs(got["loss"] - rec["loss"]) <= TOL, (which, got, rec)


def test_recorded_acceptance(metrics):
    spec = metrics["spec"]
    assert spec["k"] == 4 and spec["prompts"] == 50 and spec["greedy"]
    assert spec["mean_acceptance_length"] >= 2.0
    assert metrics["target"]["heldout"]["loss"] < metrics["draft"]["heldout"]["loss"] + 1.0


def test_bundled_eagle_head_drafts_and_is_lossless():
    """The bundled EAGLE-3 head (``--spec eagle`` with no ``--draft``): stored in bfloat16
    within a few MB, loaded in float32, greedy SD == AR, and it drafts like a trained head
    (an untrained one accepts ~0 drafts)."""
    from moesd_jax.data import heldout_prompts
    from moesd_jax.runtime import load_models
    from moesd_jax.spec.decoder import SpecDecoder

    d = bundled_model_dir("eagle")
    assert d.is_dir(), f"{d} missing: scripts/train_eagle.py --export-bf16 (README)"
    assert _dir_bytes(d) <= 8 * 1024 * 1024, _dir_bytes(d)
    lm = load_models(spec="eagle", k=4)
    assert lm.draft_path == str(d) and lm.draft.cfg.param_dtype == "float32"
    prompts = [lm.tokenizer.encode(t) for t in heldout_prompts(lm.tokenizer, n=4,
                                                                 prompt_tokens=48)]
    ar = SpecDecoder(lm.target).generate(prompts, 32)
    sd = SpecDecoder(lm.target, lm.draft, lm.spec).generate(prompts, 32)
    assert [r.token_ids for r in sd] == [r.token_ids for r in ar]
    acc = np.mean([r.stats["mean_acceptance_length"] for r in sd])
    assert acc >= 1.8, acc
