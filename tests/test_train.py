"""Training: the train forward equals inference, capacity dispatch, the schedule, a loop
that learns, exact segmenting with ``stop_at`` + resume, distillation, export, the CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from moesd_jax.checkpoint import load_model
from moesd_jax.models import moe as moe_mod
from moesd_jax.train import (
    TrainConfig,
    dispatch_capacity,
    forward_train,
    make_schedule,
    metrics_positions,
    switch_aux_loss,
    train,
)
from tests.helpers import build, dense_cfg, moe_cfg

REPO = Path(__file__).resolve().parent.parent


def _stream(n=4000, vocab=64, seed=0):
    """A learnable token stream: a fixed random 'phrase book' of 8-token phrases."""
    rng = np.random.default_rng(seed)
    phrases = rng.integers(1, vocab, (12, 8))
    return phrases[rng.integers(0, 12, n // 8)].reshape(-1).astype(np.int32)


def _tc(**kw):
    base = dict(steps=24, batch=8, seq_len=32, lr=1e-2, warmup=4, log_every=4, eval_every=0,
                eval_windows=4, ckpt_every=0)
    base.update(kw)
    return TrainConfig(**base)


def test_forward_train_equals_inference_forward():
    cfg = moe_cfg(moe={"shared_expert_dim": 32})
    model = build(cfg)
    tok = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, cfg.vocab_size)
    logits, aux = forward_train(model, tok, "dense")
    ref, _, _ = model(tok, metrics_positions(tok), model.init_cache(2, 16), dispatch="dense")
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    assert aux.shape == () and float(aux) > 0


def _moe_inputs(t=24, d=16, f=8, e=4, k=2, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(ks[0], (t, d))
    wg, wu = (jax.random.normal(kk, (e, d, f)) / 4 for kk in ks[1:3])
    wd = jax.random.normal(ks[3], (e, f, d)) / 4
    ids = jax.random.randint(ks[4], (t, k), 0, e)
    ids = ids.at[:, 1].set((ids[:, 0] + 1) % e)  # distinct experts per token
    comb = jax.nn.softmax(jax.random.normal(ks[4], (t, k)), axis=-1)
    return x, wg, wu, wd, ids, comb


def test_capacity_dispatch_without_drops_equals_dense():
    x, wg, wu, wd, ids, comb = _moe_inputs()
    t, k = ids.shape
    e = wg.shape[0]
    # capacity >= every assignment: nothing is dropped
    got = dispatch_capacity(x, wg, wu, wd, ids, comb, capacity_factor=e / k)
    ref = moe_mod.DISPATCH["dense"](x, wg, wu, wd, ids, comb)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_capacity_dispatch_drops_late_assignments():
    x, wg, wu, wd, ids, comb = _moe_inputs()
    t, k = ids.shape
    e = wg.shape[0]
    cf = 0.5
    c = int(np.ceil(t * k / e * cf))
    got = np.asarray(dispatch_capacity(x, wg, wu, wd, ids, comb, capacity_factor=cf))
    # reference: walk assignments in (token, slot) order; each expert keeps its first c
    seen = np.zeros(e, int)
    keep = np.zeros((t, k), bool)
    for i in range(t):
        for j in range(k):
            ex = int(ids[i, j])
            keep[i, j] = seen[ex] < c
            seen[ex] += 1
    assert 0 < keep.sum() < t * k  # the case exercises drops
    ref = moe_mod.DISPATCH["dense"](x, wg, wu, wd, ids, jnp.where(keep, comb, 0.0))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # and the dispatch is differentiable (training uses it)
    g = jax.grad(lambda w: jnp.sum(dispatch_capacity(x, w, wu, wd, ids, comb, None, cf)))(wg)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


def test_switch_aux_loss_is_one_when_balanced_and_larger_when_not():
    e, t = 4, 8
    ids = jnp.stack([jnp.arange(t) % e, (jnp.arange(t) + 1) % e], axis=1)
    uniform = jnp.full((t, e), 1.0 / e)
    np.testing.assert_allclose(switch_aux_loss(uniform, ids), 1.0, rtol=1e-6)
    skewed_ids = jnp.zeros((t, 2), jnp.int32).at[:, 1].set(1)
    skewed_p = jnp.tile(jnp.array([0.5, 0.4, 0.05, 0.05]), (t, 1))
    assert float(switch_aux_loss(skewed_p, skewed_ids)) > 1.5


def test_schedule_warmup_then_cosine_to_floor():
    tc = _tc(steps=100, lr=1e-2, warmup=10, min_lr_ratio=0.1)
    s = make_schedule(tc)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(10)), 1e-2, rtol=1e-6)
    assert float(s(50)) < float(s(20)) < 1e-2
    np.testing.assert_allclose(float(s(100)), 1e-3, rtol=1e-5)


def test_training_learns_exports_and_segments_exactly(tmp_path):
    cfg = dataclasses.replace(moe_cfg(vocab=64, layers=1), param_dtype="bfloat16")
    stream = _stream()
    held = _stream(n=1200, seed=0)  # same phrase book: learnable
    tc = _tc(ckpt_every=12, dispatch="capacity")
    # one run straight through ...
    full = train(cfg, tc, tmp_path / "full", stream, held, progress=False)
    # ... and the same schedule in two segments: stop at 12, then resume to the end
    seg = train(cfg, dataclasses.replace(tc, stop_at=12), tmp_path / "seg", stream, held,
                progress=False)
    assert seg["steps"] == 12 and seg["stopped_early"]
    assert not full["stopped_early"] and full["steps"] == 24

    def ckpt(run, step):
        path = (tmp_path / run / "ckpt" / str(step) / "default").resolve()
        return [np.asarray(x) for x in jax.tree.leaves(ocp.StandardCheckpointer().restore(path))]

    # stop_at does not change the schedule: the state at step 12 is identical
    for a, b in zip(ckpt("full", 12), ckpt("seg", 12), strict=True):
        np.testing.assert_array_equal(a, b)
    resumed = train(cfg, tc, tmp_path / "seg", stream, held, resume=True, progress=False)
    assert resumed["steps"] == 24
    log = [json.loads(line) for line in open(tmp_path / "seg" / "log.jsonl")]
    starts = [r["step"] for r in log if r.get("event") == "start"]
    assert starts == [0, 12]
    # the loop learns: held-out loss far below the uniform ln(64) = 4.16
    assert full["heldout"]["loss"] < 3.0, full["heldout"]
    first = next(r for r in log if "ce" in r)
    assert resumed["last"]["ce"] < first["ce"]
    # the export is a bf16 checkpoint of the configured model that loads and evaluates
    model, _ = load_model(tmp_path / "full" / "final")
    assert model.cfg == cfg
    dtypes = {str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {"bfloat16"}


def test_distillation_pulls_the_student_towards_the_teacher(tmp_path):
    teacher_cfg = moe_cfg(vocab=64, layers=1)
    student_cfg = dense_cfg(vocab=64, d=16)
    stream = _stream()
    teacher_out = train(teacher_cfg, _tc(steps=16), tmp_path / "t", stream, progress=False)
    teacher, _ = load_model(teacher_out["export"])
    res = train(student_cfg, _tc(steps=16, distill_alpha=1.0), tmp_path / "s", stream,
                teacher=teacher, progress=False)
    log = [json.loads(line) for line in open(tmp_path / "s" / "log.jsonl")]
    kls = [r["kl"] for r in log if "kl" in r]
    assert len(kls) >= 3 and kls[-1] < 0.7 * kls[0], kls
    assert 0.0 <= res["last"]["agree"] <= 1.0
    with pytest.raises(ValueError, match="vocab_size"):
        train(dense_cfg(vocab=32), _tc(), tmp_path / "bad", stream, teacher=teacher,
              progress=False)


def test_bad_steps_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="stop_at=0"):
        train(dense_cfg(), _tc(stop_at=0), tmp_path, _stream(), progress=False)


def test_cli_reports_bad_arguments_without_traceback():
    r = subprocess.run([sys.executable, "scripts/train.py", "--steps", "5"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "--model-config is required" in r.stderr and "Traceback" not in r.stderr
