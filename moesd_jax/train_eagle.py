"""Training an EAGLE-3 head against a frozen target (features computed on the fly).

* Each step runs the frozen target over a batch of corpus windows (``data.batch_iterator``)
  and keeps its logits and the hidden states of the head's 3 layers (``stop_gradient``);
* EAGLE-3's *training-time test*: the head is unrolled ``ttt_steps`` times; step k reads,
  at row index i (the root position), the token x_{i+k+1} at position i + k and, for
  k >= 1, its own pre-norm output of step k - 1 at the same index instead of the
  target's feature, and predicts x_{i+k+2}. Its attention sees step 0's keys causally
  (the committed prefix, j <= i) and the keys of steps 1..k at index i only (the node's
  drafted ancestors) -- exactly what a depth-k tree node sees in ``Eagle.propose``;
* loss: ``sum_k decay**k * KL(target || head)`` over the draft vocabulary (the target
  distribution renormalised over it when the vocabulary is reduced), gradients flowing
  through the unrolled features;
* the optimizer, schedule, resumable orbax checkpoints (``<out>/ckpt``, ``--stop-at`` /
  ``--resume``), JSON-lines log (``<out>/log.jsonl``) and tqdm bar are ``train.py``'s;
  the head is trained in float32 and exported natively to ``<out>/final``
  (``spec/eagle_io.py``; loadable by ``--spec eagle --draft <out>/final``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moesd_jax.models.attention import MASK_VALUE
from moesd_jax.spec.eagle import EagleConfig, EagleHead
from moesd_jax.train import (
    RunConfig,
    make_optimizer,
    make_schedule,
    metrics_positions,
    open_run,
    save_train_state,
)


@dataclasses.dataclass(frozen=True)
class EagleTrainConfig(RunConfig):
    """Hyper-parameters of a head's run: ``train.RunConfig``'s fields (with this run's
    defaults) plus the training-time test's."""

    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    eval_windows: int = 16
    ttt_steps: int = 4  # unrolled draft steps (EAGLE-3 uses up to 7)
    loss_decay: float = 0.8  # weight of step k: decay**k (EAGLE-3's 0.8)
    target_dispatch: str | None = "capacity2"  # MoE backend of the target's forward


def vocab_map(tokens: np.ndarray, vocab_size: int, draft_vocab: int):
    """A reduced draft vocabulary: the ``draft_vocab`` most frequent ids of ``tokens``
    (ties by id), as public heads build it. Returns (d2t int32 [Vd], t2d bool [V])."""
    counts = np.bincount(np.asarray(tokens).reshape(-1), minlength=vocab_size)[:vocab_size]
    keep = np.sort(np.argsort(-counts, kind="stable")[:draft_vocab])
    t2d = np.zeros((vocab_size,), bool)
    t2d[keep] = True
    return (keep - np.arange(draft_vocab)).astype(np.int32), t2d


def ttt_attention(q_BTHC, ks, vs, num_kv_heads: int):
    """Attention of step k's queries: step 0's keys causally, steps 1..k's at the same
    index only. ``ks``/``vs``: k + 1 arrays [B, T, G, C] (RoPE applied to the keys)."""
    b, t, h, c = q_BTHC.shape
    g = num_kv_heads
    q = q_BTHC.reshape(b, t, g, h // g, c).astype(jnp.float32) * (c**-0.5)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    s0 = jnp.einsum("BTGRC,BSGC->BGRTS", q, f32(ks[0]))
    s0 = jnp.where(jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None, None], s0, MASK_VALUE)
    diag = [jnp.einsum("BTGRC,BTGC->BGRT", q, f32(k))[..., None] for k in ks[1:]]
    p = jax.nn.softmax(jnp.concatenate([s0, *diag], axis=-1), axis=-1)
    o = jnp.einsum("BGRTS,BSGC->BTGRC", p[..., :t], f32(vs[0]))
    for j, v in enumerate(vs[1:]):
        o = o + jnp.einsum("BGRT,BTGC->BTGRC", p[..., t + j], f32(v))
    return o.reshape(b, t, h, c).astype(q_BTHC.dtype)


def ttt_forward(head: EagleHead, embed_VD, tokens_BT1, feats_BTK, steps: int):
    """The head unrolled ``steps`` times (training-time test; see the module docstring).

    Args:
      tokens_BT1: int32 [B, T + 1] corpus windows x_0..x_T.
      feats_BTK: the target's hidden states at positions 0..T-1 [B, T, 3D].

    Returns:
      ``steps`` draft-vocabulary logits [B, T, Vd]: step k at index i predicts x_{i+k+2}.
    """
    b, t1 = tokens_BT1.shape
    t = t1 - 1
    feat = head.project(feats_BTK)
    i = jnp.arange(t, dtype=jnp.int32)
    ks, vs, out = [], [], []
    for k in range(steps):
        tok = jnp.concatenate([tokens_BT1[:, k + 1:], jnp.zeros((b, k), jnp.int32)], axis=1)
        pos = jnp.broadcast_to((i + k)[None, :], (b, t))
        x, resid = head.layer_inputs(tok, feat, embed_VD)
        q, kk, vv = head.attn.qkv(x, pos)
        ks.append(kk)
        vs.append(vv)
        o = ttt_attention(q, ks, vs, head.cfg.num_kv_heads)
        logits, feat = head.finish(head.attn.out(o), resid)
        out.append(logits)
    return out


def ttt_loss(head: EagleHead, embed_VD, tokens_BT1, feats_BTK, target_logits_BTV,
             steps: int, decay: float):
    """EAGLE-3 training-time-test loss over one batch: ``sum_k decay**k * KL_k``.

    Args:
      tokens_BT1, feats_BTK: as :func:`ttt_forward`.
      target_logits_BTV: the target's logits at positions 0..T-1 (p_t predicts x_{t+1}).

    Returns:
      (loss, metrics: ``kl_k`` and ``acc_k`` (top-1 agreement with the target) per step).
    """
    b, t1 = tokens_BT1.shape
    t = t1 - 1
    if head.cfg.reduced:  # the target renormalised over the draft vocabulary
        target_logits_BTV = target_logits_BTV[..., head.draft_ids()]
    tlp = jax.nn.log_softmax(target_logits_BTV.astype(jnp.float32), axis=-1)
    i = jnp.arange(t, dtype=jnp.int32)
    metrics = {}
    loss = jnp.zeros((), jnp.float32)
    for k, logits in enumerate(ttt_forward(head, embed_VD, tokens_BT1, feats_BTK, steps)):
        # step k at index i predicts x_{i+k+2}: the target's distribution at i + k + 1
        tgt = jnp.concatenate([tlp[:, k + 1:], jnp.zeros((b, k + 1, tlp.shape[-1]))], axis=1)
        valid = (i + k + 1 <= t - 1).astype(jnp.float32)[None, :]  # [1, T]
        lp = jax.nn.log_softmax(logits, axis=-1)
        kl_BT = jnp.sum(jnp.exp(tgt) * (tgt - lp), axis=-1)
        n = b * jnp.sum(valid)
        kl = jnp.sum(kl_BT * valid) / n
        acc = jnp.sum((jnp.argmax(logits, -1) == jnp.argmax(tgt, -1)) * valid) / n
        loss = loss + (decay**k) * kl
        metrics[f"kl_{k}"] = kl
        metrics[f"acc_{k}"] = acc
    metrics["loss"] = loss
    return loss, metrics


def _target_outputs(target, tokens_BT1, hidden_layers, dispatch):
    inputs = tokens_BT1[:, :-1]
    b, t = inputs.shape
    logits, _, _, feats = target(inputs, metrics_positions(inputs), target.init_cache(b, t),
                                 dispatch=dispatch, hidden_layers=tuple(hidden_layers))
    embed = target.embed.embedding_VD[...]
    return jax.tree.map(jax.lax.stop_gradient, (logits, feats, embed))


def make_target_fn(target_graphdef, hidden_layers, tc: EagleTrainConfig):
    """Jitted ``(target_state, batch_BT1) -> (logits, features, embedding)``, no gradient.

    Its own program: traced inside the head's ``jax.grad`` the same forward ran 3x slower
    on this CPU (7.3 s vs 0.85 + 1.2 s per step at batch 8 x 256, bundled target).
    """

    def fn(target_state, batch):
        target = nnx.merge(target_graphdef, target_state)
        return _target_outputs(target, batch, hidden_layers, tc.target_dispatch)

    return jax.jit(fn)


def make_eagle_step(graphdef, target_graphdef, optimizer, tc: EagleTrainConfig, hidden_layers):
    """``(params, opt_state, rest, batch_BT1, target_state) -> (params, opt_state,
    metrics)``: the target's forward, then the head's jitted update; ``rest`` = the
    head's non-trained variables (vocabulary maps)."""
    target_fn = make_target_fn(target_graphdef, hidden_layers, tc)

    def loss_fn(params, rest, batch, logits, feats, embed):
        head = nnx.merge(graphdef, params, rest)
        return ttt_loss(head, embed, batch, feats, logits, tc.ttt_steps, tc.loss_decay)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, rest, batch, logits, feats, embed):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, rest, batch, logits, feats,
                                                         embed)
        metrics["grad_norm"] = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    def step(params, opt_state, rest, batch, target_state):
        return update(params, opt_state, rest, batch, *target_fn(target_state, batch))

    return step


def make_eval(graphdef, target_graphdef, tc: EagleTrainConfig, hidden_layers):
    """``(params, rest, batch_BT1, target_state) -> metrics`` (no gradient)."""
    target_fn = make_target_fn(target_graphdef, hidden_layers, tc)

    @jax.jit
    def ev(params, rest, batch, logits, feats, embed):
        head = nnx.merge(graphdef, params, rest)
        return ttt_loss(head, embed, batch, feats, logits, tc.ttt_steps, tc.loss_decay)[1]

    return lambda params, rest, batch, ts: ev(params, rest, batch, *target_fn(ts, batch))


def init_eagle_training(cfg: EagleConfig, tc: EagleTrainConfig, target, vocab_maps=None):
    """A fresh float32 head of ``cfg`` and its jitted step.

    Returns:
      ``(graphdef, params, rest, opt_state, target_state, step_fn, target_graphdef)``.
    """
    cfg = dataclasses.replace(cfg, param_dtype="float32", compute_dtype="float32")
    head = EagleHead(cfg, nnx.Rngs(tc.seed))
    if vocab_maps is not None and cfg.reduced:
        head.d2t[...] = jnp.asarray(vocab_maps[0], jnp.int32)
        head.t2d[...] = jnp.asarray(vocab_maps[1], jnp.bool_)
    graphdef, params, rest = nnx.split(head, nnx.Param, ...)
    target_graphdef, target_state = nnx.split(target)
    optimizer = make_optimizer(tc)  # reads the optimizer fields only
    step_fn = make_eagle_step(graphdef, target_graphdef, optimizer, tc, cfg.hidden_layers)
    return (graphdef, params, rest, optimizer.init(params), target_state, step_fn,
            target_graphdef)


def train_eagle(cfg: EagleConfig, tc: EagleTrainConfig, target, out: str | Path,
                train_tokens: np.ndarray, heldout_tokens: np.ndarray | None = None,
                resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Trains an EAGLE-3 head for ``target`` (frozen) and exports ``<out>/final``.

    Args:
      cfg: the head (``EagleConfig.for_target``); a reduced ``draft_vocab`` takes the most
        frequent ids of ``train_tokens``.
      tc: hyper-parameters. target: the target model (float32 weights preferred on CPU).
      out: run directory (``log.jsonl``, ``ckpt/``, ``final/``).
      train_tokens / heldout_tokens: 1-D token streams of the target's tokenizer.
      resume: continue from the latest checkpoint in ``<out>/ckpt``.

    Returns:
      Summary dict (steps run, last metrics, held-out metrics, export path).
    """
    from tqdm import tqdm

    from moesd_jax.data import batch_iterator, eval_windows
    from moesd_jax.spec.eagle_io import save_eagle

    out = Path(out)
    if tc.steps < 1 or (tc.stop_at is not None and tc.stop_at < 1):
        raise ValueError(f"steps={tc.steps} and stop_at={tc.stop_at} must be >= 1")
    if tc.ttt_steps < 1:
        raise ValueError(f"ttt_steps={tc.ttt_steps} must be >= 1")
    cfg.check_target(target.cfg)
    end = tc.steps if tc.stop_at is None else min(tc.steps, tc.stop_at)
    out.mkdir(parents=True, exist_ok=True)
    maps = vocab_map(train_tokens, cfg.vocab_size, cfg.vd) if cfg.reduced else None
    graphdef, params, rest, opt_state, tstate, step_fn, tgraph = init_eagle_training(
        cfg, tc, target, maps)
    mngr, start, params, opt_state, log = open_run(out, params, opt_state, resume)

    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    log({"event": "start", "step": start, "params": n_params, "eagle_config":
         dataclasses.asdict(cfg), "train_config": dataclasses.asdict(tc), "time": time.time()})
    batches = batch_iterator(train_tokens, tc.batch, tc.seq_len, seed=tc.seed * 1000003 + start)
    schedule = make_schedule(tc)
    evaluate = (make_eval(graphdef, tgraph, tc, cfg.hidden_layers)
                if heldout_tokens is not None else None)
    ev_rows = None if heldout_tokens is None else eval_windows(heldout_tokens, tc.seq_len,
                                                               tc.eval_windows)

    def held_out():
        ms = [evaluate(params, rest, jnp.asarray(ev_rows[i: i + tc.batch]), tstate)
              for i in range(0, len(ev_rows) - tc.batch + 1, tc.batch)]
        return {k: round(float(np.mean([m[k] for m in ms])), 5) for k in ms[0]}

    t0 = time.time()
    last: dict[str, Any] = {}
    step = start
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, unit="step",
               dynamic_ncols=True)
    mark_t, mark_step = time.time(), start
    try:
        while step < end:
            batch = jnp.asarray(next(batches))
            params, opt_state, m = step_fn(params, opt_state, rest, batch, tstate)
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == end:
                now = time.time()
                rec = {"step": step, **{k: round(float(v), 5) for k, v in m.items()},
                       "lr": float(schedule(step)),
                       "step_s": round((now - mark_t) / max(step - mark_step, 1), 3),
                       "elapsed_s": round(now - t0, 1)}
                mark_t, mark_step = now, step
                log(rec)
                last = rec
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc0=f"{rec['acc_0']:.2f}")
            if evaluate is not None and tc.eval_every and step % tc.eval_every == 0:
                ev = held_out()
                log({"step": step, **{f"eval_{k}": v for k, v in ev.items()}})
                bar.write(f"step {step}: held-out loss {ev['loss']:.4f} acc_0 {ev['acc_0']:.3f}")
            if tc.ckpt_every and step % tc.ckpt_every == 0:
                save_train_state(mngr, step, params, opt_state)
            if tc.time_budget_min is not None and time.time() - t0 > 60 * tc.time_budget_min:
                bar.write(f"time budget of {tc.time_budget_min} min reached at step {step}")
                break
    finally:
        bar.close()
    if mngr.latest_step() != step:
        save_train_state(mngr, step, params, opt_state)
    final = save_eagle(out / "final", nnx.merge(graphdef, params, rest))
    summary: dict[str, Any] = {"steps": step, "stopped_early": step < tc.steps, "last": last,
                               "params": n_params, "export": str(final),
                               "wall_s": round(time.time() - t0, 1)}
    if evaluate is not None:
        summary["heldout"] = held_out()
    log({"event": "end", **summary})
    log.close()
    return summary


__all__ = ["EagleTrainConfig", "train_eagle", "ttt_forward", "ttt_loss", "ttt_attention",
           "vocab_map", "init_eagle_training", "make_eagle_step"]
