"""Training of the bundled models: next-token cross-entropy or distillation from a target.

* optax AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``, global-norm clip;
* the jitted step works on ``nnx.split`` state (a pure pytree), not ``nnx.jit``;
* MoE layers train through a differentiable float32 dispatch (``dense``: exact, every
  expert; ``capacity``: GShard-style per-expert capacity, about the active FLOPs) and add a
  Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (averaged over MoE
  layers, times ``aux_coef``) so that every expert keeps receiving tokens;
* a draft can learn from data (CE) or from a teacher's logits: ``KL(teacher || student)``
  mixed with CE as ``alpha * KL + (1 - alpha) * CE``;
* parameters are trained in float32 whatever the config's ``param_dtype``; the exported
  checkpoint (``<out>/final``) is cast to the config's ``param_dtype`` (the bundle stores
  bfloat16 and computes in float32);
* resumable orbax checkpoints (params + optimizer state + step + data-iterator seed) every
  ``ckpt_every`` steps under ``<out>/ckpt``; a JSON-lines loss log at ``<out>/log.jsonl``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moesd_jax.config import ModelConfig
from moesd_jax.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every training run here shares: the schedule (linear warm-up to ``lr``, cosine
    to ``lr * min_lr_ratio`` at ``steps``), AdamW with global-norm clipping, data seed,
    logging, held-out evaluation, checkpoints and the stopping points. The models' runs
    (:class:`TrainConfig`, ``train_eagle.EagleTrainConfig``) add their own fields."""

    steps: int = 2000
    batch: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_windows: int = 32
    ckpt_every: int = 200
    time_budget_min: float | None = None
    stop_at: int | None = None  # stop (and export) at this step; the schedule keeps `steps`


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Hyper-parameters of one model's training run (pre-training or distillation)."""

    aux_coef: float = 0.01
    distill_alpha: float = 1.0  # weight of KL(teacher || student); 1 - alpha goes to CE
    distill_temperature: float = 1.0
    dispatch: str = "dense"  # MoE backend while training (must be differentiable)
    teacher_dispatch: str | None = "capacity2"  # MoE backend of the teacher's forward


# ---------------------------------------------------------------------------------------
# model helpers


def training_config(cfg: ModelConfig) -> ModelConfig:
    """The config trained: float32 parameters and compute (the export casts back)."""
    return dataclasses.replace(cfg, param_dtype="float32", compute_dtype="float32")


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Total and active parameter counts.

    Active = every parameter a token touches: all non-routed-expert parameters (embedding,
    LM head, attention, norms, routers, shared experts and their gates, dense MLPs) plus
    ``top_k`` routed experts' weights in each MoE layer.
    """
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    total = 0
    routed = 0
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        n = int(np.prod(x.shape))
        total += n
        if any(str(getattr(p, "key", p)) in ("w_gate_EDF", "w_up_EDF", "w_down_EFD")
               for p in path):
            routed += n
    active = total - routed
    if cfg.moe is not None:
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
        active += n_moe * cfg.moe.top_k * 3 * cfg.d_model * cfg.moe.expert_dim
    return {"total": total, "active": active, "routed_expert": routed}


def switch_aux_loss(probs_TE: jax.Array, ids_TK: jax.Array) -> jax.Array:
    """Switch-Transformer load balance ``E * sum_e f_e * P_e`` (1.0 when uniform)."""
    e = probs_TE.shape[-1]
    f_E = jnp.mean(jnp.sum(jax.nn.one_hot(ids_TK, e, dtype=jnp.float32), axis=1), axis=0)
    f_E = f_E / ids_TK.shape[1]
    p_E = jnp.mean(probs_TE, axis=0)
    return e * jnp.sum(f_E * p_E)


def dispatch_capacity(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, ids_TK, combine_TK,
                      max_active=None, capacity_factor: float = 1.25):
    """Sparse, differentiable training dispatch with a per-expert capacity (GShard style).

    Each expert processes at most ``C = ceil(T * K / E * capacity_factor)`` assignments
    (earlier tokens first); assignments past an expert's capacity are dropped (their
    contribution is zero, the shared expert and residual still apply). Costs about
    ``capacity_factor`` times the active experts' FLOPs instead of all E experts'
    (``dense``). Training only: inference uses the exact backends.
    """
    del max_active
    t, k = ids_TK.shape
    e, d, _ = w_gate_EDF.shape
    c = max(1, int(math.ceil(t * k / e * capacity_factor)))
    flat = ids_TK.reshape(-1)
    onehot = jax.nn.one_hot(flat, e, dtype=jnp.int32)  # dropped id E -> zeros
    pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
    keep = (flat < e) & (pos < c)
    slot = jnp.where(keep, flat * c + pos, e * c)  # e * c: a dummy slot
    token = (jnp.arange(t * k, dtype=jnp.int32) // k)
    src = jnp.full((e * c + 1,), t, jnp.int32).at[slot].set(token)[: e * c]
    dt = x_TD.dtype
    xp = jnp.concatenate([x_TD, jnp.zeros((1, d), dt)], axis=0)
    xb = jnp.take(xp, src, axis=0).reshape(e, c, d)
    g = jnp.einsum("ECD,EDF->ECF", xb, w_gate_EDF.astype(dt))
    u = jnp.einsum("ECD,EDF->ECF", xb, w_up_EDF.astype(dt))
    yb = jnp.einsum("ECF,EFD->ECD", jax.nn.silu(g) * u, w_down_EFD.astype(dt))
    yb = jnp.concatenate([yb.reshape(e * c, d), jnp.zeros((1, d), dt)], axis=0)
    w = jnp.where(keep, combine_TK.reshape(-1), 0.0).astype(dt)
    y = jnp.take(yb, slot, axis=0) * w[:, None]
    return y.reshape(t, k, d).sum(axis=1)


def _register_dispatch() -> None:
    from moesd_jax.models import moe

    moe.DISPATCH.setdefault("capacity", dispatch_capacity)
    # teacher forwards in distillation: a roomier capacity, so drops are rare
    moe.DISPATCH.setdefault("capacity2", functools.partial(dispatch_capacity,
                                                           capacity_factor=2.0))


_register_dispatch()


def forward_train(model: Transformer, tokens_BT: jax.Array, dispatch: str = "dense"):
    """Forward for training: (logits_BTV float32, mean aux loss over MoE layers or 0).

    Same computation as ``Transformer.__call__`` on a fresh cache (positions 0..T-1,
    causal), but also returns the router probabilities' load-balancing loss.
    """
    cfg = model.cfg
    b, t = tokens_BT.shape
    dt = jnp.dtype(cfg.compute_dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
    cache = model.init_cache(b, t)
    k_cache, v_cache, start = cache.k, cache.v, cache.lengths
    x = model.embed(tokens_BT, dt)
    aux = []
    for layer in model.layers:
        a, k_cache, v_cache = layer.attn(layer.attn_norm(x), pos, k_cache, v_cache,
                                         layer.layer, start, None)
        x = x + a
        h = layer.ffn_norm(x)
        if layer.is_moe:
            h_TD = h.reshape(b * t, -1)
            y, ids = layer.moe(h_TD, None, dispatch)
            probs, _, _ = layer.moe.route(h_TD)
            aux.append(switch_aux_loss(probs, ids))
            y = y.reshape(b, t, -1)
        else:
            y = layer.mlp(h)
        x = x + y
    x = model.final_norm(x)
    if cfg.tie_embeddings:
        logits = model.embed.attend(x)
    else:
        logits = x @ model.lm_head_DV[...].astype(dt)
    aux_loss = jnp.mean(jnp.stack(aux)) if aux else jnp.zeros((), jnp.float32)
    return logits.astype(jnp.float32), aux_loss


def _cross_entropy(logits_BTV, targets_BT):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT))


def _kl(teacher_logits, student_logits, temperature):
    t = temperature
    lp_t = jax.nn.log_softmax(teacher_logits / t, axis=-1)
    lp_s = jax.nn.log_softmax(student_logits / t, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(lp_t) * (lp_t - lp_s), axis=-1)) * (t * t)


# ---------------------------------------------------------------------------------------
# optimizer and step


def make_schedule(tc: RunConfig) -> optax.Schedule:
    warm = max(1, min(tc.warmup, tc.steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=warm,
        decay_steps=max(tc.steps, warm + 1), end_value=tc.lr * tc.min_lr_ratio)


def make_optimizer(tc: RunConfig) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                    mask=decay_mask),
    )


def make_train_step(graphdef, optimizer, tc: TrainConfig, teacher_graphdef=None) -> Callable:
    """Jitted ``(params, opt_state, batch_BT1[, teacher_params]) -> (params, opt, metrics)``."""

    def loss_fn(params, batch, teacher_params):
        model = nnx.merge(graphdef, params)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits, aux = forward_train(model, inputs, tc.dispatch)
        ce = _cross_entropy(logits, targets)
        metrics = {"ce": ce, "aux": aux}
        if teacher_params is not None:
            teacher = nnx.merge(teacher_graphdef, teacher_params)
            t_logits, _, _ = teacher(inputs, metrics_positions(inputs), teacher.init_cache(
                inputs.shape[0], inputs.shape[1]), dispatch=tc.teacher_dispatch)
            t_logits = jax.lax.stop_gradient(t_logits)
            kl = _kl(t_logits, logits, tc.distill_temperature)
            agree = jnp.mean((jnp.argmax(t_logits, -1) == jnp.argmax(logits, -1))
                             .astype(jnp.float32))
            metrics.update(kl=kl, agree=agree)
            loss = tc.distill_alpha * kl + (1.0 - tc.distill_alpha) * ce
        else:
            loss = ce
        loss = loss + tc.aux_coef * aux
        metrics["loss"] = loss
        return loss, metrics

    def step(params, opt_state, batch, teacher_params=None):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, batch, teacher_params)
        metrics["grad_norm"] = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def metrics_positions(tokens_BT: jax.Array) -> jax.Array:
    b, t = tokens_BT.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))


# ---------------------------------------------------------------------------------------
# evaluation


def evaluate(model: Transformer, tokens: np.ndarray, seq_len: int = 256,
             max_windows: int | None = 32, batch: int = 16,
             dispatch: str | None = None) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) and perplexity on deterministic windows.

    Args:
      model: any model (its own dtypes; ``dispatch`` overrides the MoE backend).
      tokens: 1-D token stream (e.g. the held-out split).
      seq_len: window length (inputs); see :func:`moesd_jax.data.eval_windows`.
      max_windows: windows evenly spaced over the stream (None = all).
      batch: windows per forward call (the last batch is padded, padding not counted).

    Returns:
      ``{"loss", "ppl", "tokens", "windows"}``.
    """
    from moesd_jax.data import eval_windows

    win = eval_windows(tokens, seq_len, max_windows)
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll_sum(state, rows):
        m = nnx.merge(graphdef, state)
        inputs, targets = rows[:, :-1], rows[:, 1:]
        logits, _, _ = m(inputs, metrics_positions(inputs),
                         m.init_cache(inputs.shape[0], inputs.shape[1]), dispatch=dispatch)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets),
                       axis=1)

    total, n = 0.0, 0
    bsz = min(batch, len(win))
    for i in range(0, len(win), bsz):
        rows = win[i: i + bsz]
        real = len(rows)
        if real < bsz:
            rows = np.concatenate([rows, np.repeat(rows[-1:], bsz - real, axis=0)])
        s = np.asarray(nll_sum(state, jnp.asarray(rows)), np.float64)[:real]
        total += float(s.sum())
        n += real * seq_len
    loss = total / n
    return {"loss": loss, "ppl": math.exp(loss), "tokens": n, "windows": int(len(win))}


# ---------------------------------------------------------------------------------------
# checkpoints


def _ckpt_manager(directory: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        directory.resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def save_train_state(mngr, step: int, params, opt_state) -> None:
    import orbax.checkpoint as ocp

    tree = {"params": jax.tree.leaves(params), "opt": jax.tree.leaves(opt_state),
            "step": np.asarray(step, np.int64)}
    mngr.save(step, args=ocp.args.StandardSave(tree))
    mngr.wait_until_finished()


class RunLog:
    """A run's JSON-lines log (``<out>/log.jsonl``, appended to: a resumed run continues
    it); ``log(record)`` writes one flushed line."""

    def __init__(self, path: Path):
        self._f = open(path, "a")

    def __call__(self, rec: dict) -> None:
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def open_run(out: Path, params, opt_state, resume: bool):
    """``(checkpoint manager, start step, params, opt_state, log)`` of the run directory
    ``out``: with ``resume`` the state of its latest checkpoint (if any) and its step."""
    mngr = _ckpt_manager(out / "ckpt")
    start = 0
    if resume:
        got = restore_train_state(mngr, params, opt_state)
        if got is not None:
            start, params, opt_state = got
    return mngr, start, params, opt_state, RunLog(out / "log.jsonl")


def restore_train_state(mngr, params, opt_state):
    """Latest (step, params, opt_state) or None when the manager holds no checkpoint."""
    import orbax.checkpoint as ocp

    step = mngr.latest_step()
    if step is None:
        return None
    p_leaves, p_def = jax.tree.flatten(params)
    o_leaves, o_def = jax.tree.flatten(opt_state)
    abstract = lambda xs: [jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype) for x in xs]
    target = {"params": abstract(p_leaves), "opt": abstract(o_leaves),
              "step": jax.ShapeDtypeStruct((), np.int64)}
    got = mngr.restore(step, args=ocp.args.StandardRestore(target))
    return (int(got["step"]), jax.tree.unflatten(p_def, got["params"]),
            jax.tree.unflatten(o_def, got["opt"]))


def export_model(model_state, graphdef, cfg: ModelConfig, path: Path,
                 tokenizer_dir: Path | None) -> Path:
    """Saves the trained float32 state as a checkpoint of ``cfg`` (cast to its dtypes)."""
    from moesd_jax.checkpoint import save_checkpoint

    trained = nnx.merge(graphdef, model_state)
    out = Transformer(cfg, nnx.Rngs(0))
    pure = jax.tree.map(lambda x: x, nnx.state(trained).to_pure_dict())
    dtype = jnp.dtype(cfg.param_dtype)
    pure = jax.tree.map(lambda x: x.astype(dtype), pure)
    state = nnx.state(out)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(out, state)
    return save_checkpoint(path, out, tokenizer_dir=tokenizer_dir)


# ---------------------------------------------------------------------------------------
# the loop


def init_training(cfg: ModelConfig, tc: TrainConfig, teacher: Transformer | None = None):
    """Fresh float32 state of ``cfg`` and its jitted step.

    Returns:
      ``(graphdef, params, opt_state, teacher_params, step_fn)``; ``teacher_params`` is
      None without a teacher, else the extra argument ``step_fn`` takes.
    """
    graphdef, params = nnx.split(Transformer(training_config(cfg), nnx.Rngs(tc.seed)))
    optimizer = make_optimizer(tc)
    teacher_graphdef = teacher_params = None
    if teacher is not None:
        teacher_graphdef, teacher_params = nnx.split(teacher)
    step_fn = make_train_step(graphdef, optimizer, tc, teacher_graphdef)
    return graphdef, params, optimizer.init(params), teacher_params, step_fn


def train(cfg: ModelConfig, tc: TrainConfig, out: str | Path, train_tokens: np.ndarray,
          heldout_tokens: np.ndarray | None = None, teacher: Transformer | None = None,
          resume: bool = False, tokenizer_dir: str | Path | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Trains ``cfg`` from scratch (or resumes) and exports ``<out>/final``.

    Args:
      cfg: model config (its ``param_dtype`` is the export dtype; training is float32).
      tc: hyper-parameters.
      out: run directory (``log.jsonl``, ``ckpt/``, ``final/``).
      train_tokens / heldout_tokens: 1-D token streams.
      teacher: distil from this model's logits (same vocabulary) instead of pure CE.
      resume: continue from the latest checkpoint in ``<out>/ckpt``.
      tokenizer_dir: tokenizer files copied into the export.

    Returns:
      Summary dict (steps run, final train metrics, held-out eval, export path).
    """
    from tqdm import tqdm

    from moesd_jax.data import batch_iterator

    out = Path(out)
    if tc.steps < 1 or (tc.stop_at is not None and tc.stop_at < 1):
        raise ValueError(f"steps={tc.steps} and stop_at={tc.stop_at} must be >= 1")
    end = tc.steps if tc.stop_at is None else min(tc.steps, tc.stop_at)
    out.mkdir(parents=True, exist_ok=True)
    if teacher is not None and teacher.cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"teacher vocab_size={teacher.cfg.vocab_size} != model vocab_size="
                         f"{cfg.vocab_size}")
    graphdef, params, opt_state, teacher_params, step_fn = init_training(cfg, tc, teacher)

    mngr, start, params, opt_state, log = open_run(out, params, opt_state, resume)

    counts = count_params(cfg)
    log({"event": "start", "step": start, "params": counts, "train_config":
         dataclasses.asdict(tc), "teacher": teacher is not None, "time": time.time()})
    # the data order depends on (seed, start step): a resumed run draws fresh windows
    batches = batch_iterator(train_tokens, tc.batch, tc.seq_len, seed=tc.seed * 1000003 + start)
    schedule = make_schedule(tc)
    t0 = time.time()
    tok_per_step = tc.batch * tc.seq_len
    last = {}
    step = start
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, unit="step",
               dynamic_ncols=True)
    mark_t, mark_step = time.time(), start
    stopped_early = False
    try:
        while step < end:
            batch = jnp.asarray(next(batches))
            if teacher_params is not None:
                params, opt_state, m = step_fn(params, opt_state, batch, teacher_params)
            else:
                params, opt_state, m = step_fn(params, opt_state, batch)
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == end:
                m = {k: float(v) for k, v in m.items()}
                now = time.time()
                tps = (step - mark_step) * tok_per_step / max(now - mark_t, 1e-9)
                mark_t, mark_step = now, step
                rec = {"step": step, **{k: round(v, 5) for k, v in m.items()},
                       "lr": float(schedule(step)), "tok_s": round(tps, 1),
                       "elapsed_s": round(now - t0, 1)}
                log(rec)
                last = rec
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tps:.0f}")
            if heldout_tokens is not None and tc.eval_every and step % tc.eval_every == 0:
                ev = evaluate(nnx.merge(graphdef, params), heldout_tokens, tc.seq_len,
                              tc.eval_windows)
                log({"step": step, "eval_loss": ev["loss"], "eval_ppl": ev["ppl"]})
                bar.write(f"step {step}: held-out loss {ev['loss']:.4f} ppl {ev['ppl']:.2f}")
            if tc.ckpt_every and step % tc.ckpt_every == 0:
                save_train_state(mngr, step, params, opt_state)
            if tc.time_budget_min is not None and time.time() - t0 > 60 * tc.time_budget_min:
                stopped_early = True
                bar.write(f"time budget of {tc.time_budget_min} min reached at step {step}")
                break
    finally:
        bar.close()
    if step < tc.steps:
        stopped_early = True
    if mngr.latest_step() != step:
        save_train_state(mngr, step, params, opt_state)
    final = export_model(params, graphdef, cfg, out / "final", tokenizer_dir)
    summary: dict[str, Any] = {"steps": step, "stopped_early": stopped_early,
                               "last": last, "params": counts, "export": str(final),
                               "wall_s": round(time.time() - t0, 1)}
    if heldout_tokens is not None:
        from moesd_jax.checkpoint import load_model

        exported, _ = load_model(final)
        summary["heldout"] = evaluate(exported, heldout_tokens, tc.seq_len, tc.eval_windows)
    log({"event": "end", **summary})
    log.close()
    return summary
