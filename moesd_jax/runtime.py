"""Resolving the models a CLI or server runs: paths, bundled defaults, spec config.

``scripts/generate.py``, ``scripts/serve.py`` and batch jobs call :func:`load_models` so
that "no --model" means the bundled target and "--spec draft" with no "--draft" means the
bundled draft, everywhere alike.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from moesd_jax.config import ConfigError, SpecConfig


def keep_host_buffers() -> bool:
    """Stops glibc from returning freed buffers to the OS (CPU hosts; process-wide).

    XLA:CPU allocates a program's temporaries with malloc on every call. By default glibc
    serves large blocks with mmap and unmaps them on free, so every decode step page-faults
    its buffers anew: measured here, a 650 KB copy inside a decode step took 4x longer for
    it. ``mallopt(M_MMAP_MAX, 0)`` and a high ``M_TRIM_THRESHOLD`` keep freed memory in the
    heap for reuse (the same as ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0``). Called by the
    CLIs (serve, generate, bench); a library user may call it too. Returns False where
    there is no glibc (the call then does nothing).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold,
                                                                       1 << 30))
    except (OSError, AttributeError):
        return False


@dataclasses.dataclass
class LoadedModels:
    target: object
    draft: object | None
    tokenizer: object | None
    spec: SpecConfig
    target_path: str
    draft_path: str | None


def load_models(model: str | None = None, draft: str | None = None, spec: str | None = None,
                k: int = 4, tree: str | None = None, dispatch: str | None = None,
                ngram_n: int = 2, mesh=None, param_dtype: str | None = "auto",
                auto: bool = False, auto_costs: str = "measured",
                spec_budget=None) -> LoadedModels:
    """Loads the target (and draft) from orbax checkpoints or HF directories.

    Args:
      model: checkpoint dir or HF dir; None = the bundled target.
      draft: draft checkpoint or HF dir; None with ``spec='draft'`` = the bundled draft.
        With ``spec='eagle'``: an EAGLE-3 head directory (native or public layout,
        ``spec/eagle_io.py``), required.
      spec: ``none``, ``draft``, ``ngram`` or ``eagle``; None = ``draft`` if a draft is
        given or the bundled pair is used, else ``none``.
      k: draft tokens per iteration. tree: named tree (``configs/spec``) or YAML path.
      dispatch: override the MoE dispatch backend.
      mesh: sharding strategy (name, MeshConfig or ShardingPlan): parameters are restored
        straight into their shardings, never gathered on one device first.
      param_dtype: dtype the weights are held in. ``auto``: on CPU the model's compute
        dtype (XLA:CPU runs bf16 dots about 15x slower than f32, and casting bf16 weights
        on every step costs a copy of them), elsewhere the stored dtype; with no mesh
        ``auto`` also applies :func:`cpu_decode_layout`. None: as stored.
      spec_budget: a :class:`~moesd_jax.config.BudgetConfig` for ``SpecConfig.budget``
        (``--budget``): the decoder applies it to a view of the target
        (``spec/budget.py``); checked against the target here.
    """
    from moesd_jax.checkpoint import bundled_model_dir, load_model

    target_path = str(model) if model else str(bundled_model_dir("target"))
    if spec is None:
        spec = "draft" if (draft or not model) else "none"
    if spec not in ("none", "draft", "ngram", "eagle"):
        raise ConfigError(f"--spec={spec!r} must be none, draft, ngram or eagle")
    if draft and spec not in ("draft", "eagle"):
        raise ConfigError(f"--draft given but --spec={spec!r}; use --spec draft (or eagle)")
    if spec == "eagle" and not draft:
        if model or not bundled_model_dir("eagle").is_dir():
            raise ConfigError("--spec eagle needs --draft PATH_TO_EAGLE_HEAD_DIR (only the "
                              "bundled target has a bundled head)")
        draft = str(bundled_model_dir("eagle"))
    from moesd_jax.config import BudgetConfig

    spec_cfg = SpecConfig(method=spec, k=k, tree=tree, ngram_n=ngram_n, auto=auto,
                          auto_costs=auto_costs, budget=spec_budget or BudgetConfig())
    spec_cfg.validate()
    if not Path(target_path).exists():
        raise ConfigError(f"--model {target_path!r} does not exist")
    shardings = None
    if mesh is not None:
        from moesd_jax import sharding

        shardings = sharding.as_plan(mesh).param_shardings
    target, tok = load_model(target_path, dispatch=dispatch, shardings=shardings,
                             param_dtype=_param_dtype(param_dtype, target_path))
    if spec_cfg.budget.enabled:  # B against the target: fail before loading the draft
        from moesd_jax.spec.budget import moe_fields

        moe_fields(spec_cfg.budget, target.cfg.moe)
    draft_model, draft_path = None, None
    if spec == "draft":
        draft_path = str(draft) if draft else str(bundled_model_dir("draft"))
        if not Path(draft_path).exists():
            raise ConfigError(f"--draft {draft_path!r} does not exist")
        draft_model, _ = load_model(draft_path, dispatch=dispatch, shardings=shardings,
                                    param_dtype=_param_dtype(param_dtype, draft_path))
        if draft_model.cfg.vocab_size != target.cfg.vocab_size:
            raise ConfigError(f"draft vocab_size={draft_model.cfg.vocab_size} != target "
                              f"vocab_size={target.cfg.vocab_size}: not the same tokenizer")
    if spec == "eagle":
        from moesd_jax.spec.eagle_io import load_eagle

        draft_path = str(draft)
        if not Path(draft_path).exists():
            raise ConfigError(f"--draft {draft_path!r} does not exist")
        draft_model = load_eagle(draft_path, target.cfg)
        if param_dtype == "auto":
            draft_model = head_as_target(draft_model, target)
    if mesh is None and param_dtype == "auto":
        cpu_decode_layout(target)
        if draft_model is not None and spec == "draft":
            cpu_decode_layout(draft_model)
    if tok is None and not model:
        from moesd_jax.data import load_tokenizer

        tok = load_tokenizer()
    return LoadedModels(target, draft_model, tok, spec_cfg, target_path, draft_path)


def head_as_target(head, target):
    """An EAGLE head with its weights in the dtype the target's are resident in: once, at
    load (CPU decoding holds the target in float32; a bfloat16 head would be converted
    to float32 on every draft step, a pass over all its weights)."""
    from moesd_jax.models.transformer import resident_dtype

    want = resident_dtype(target) or head.cfg.param_dtype
    if want != "float32" or head.cfg.param_dtype == want:
        return head
    from moesd_jax.spec.eagle_io import cast_eagle

    return cast_eagle(head, want)


def _param_dtype(choice: str | None, path: str) -> str | None:
    """Resolves ``param_dtype='auto'`` for the checkpoint at ``path`` (see load_models)."""
    if choice != "auto":
        return choice
    import jax

    if jax.default_backend() != "cpu":
        return None
    import json

    from moesd_jax.checkpoint import CONFIG_NAME

    try:
        meta = json.loads((Path(path) / CONFIG_NAME).read_text())
        return meta["model"].get("compute_dtype", "float32")
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a HF directory (imported as float32) or a bad path: load_model says


def cpu_decode_layout(model, min_expert_bytes: int = 1 << 20) -> bool:
    """On CPU, holds a ``gather``-dispatch model's experts as per-expert arrays.

    XLA:CPU copies an expert's slice of a stacked ``[E, D, F]`` array before every dot;
    per-expert arrays are read in place (``moe.unstack_experts``). That matters for large
    experts (a [1024, 1024] matvec: 1.36 ms from a slice, 0.20 ms from its own buffer);
    for small ones (under ``min_expert_bytes`` for the three matrices, e.g. the bundled
    target's 0.4 MB) the copy is cheap and the E-way ``lax.switch`` would only add
    compile time, so they stay stacked. Single-device only. Returns whether the layout
    changed.
    """
    import jax

    from moesd_jax.models import moe

    m = model.cfg.moe
    if jax.default_backend() != "cpu" or m is None:
        return False
    if m.dispatch.removesuffix("_budgeted") != "gather":
        return False
    itemsize = jax.numpy.dtype(model.cfg.param_dtype).itemsize
    if 3 * model.cfg.d_model * m.expert_dim * itemsize < min_expert_bytes:
        return False
    return moe.unstack_experts(model) > 0


DEFAULT_CACHE_DIR = (Path(os.environ.get("MOESD_JAX_CACHE", "~/.cache/moesd_jax")).expanduser()
                     / "xla")


def enable_compilation_cache(path: str | Path | None = None) -> Path:
    """Turns on JAX's persistent compilation cache (default ``~/.cache/moesd_jax/xla``).

    Public JAX options only. Every program is cached, however quick to compile, so a
    restarted server reuses the previous run's executables and the first request does
    not wait for XLA. JAX decides once per process, at its first compile, whether the
    cache is used: call this before anything is compiled (``serve.py`` does it first).
    The same options can come from the environment (``JAX_COMPILATION_CACHE_DIR`` etc.),
    which is how the test suite shares one cache with the processes it starts.
    """
    import jax

    p = Path(path).expanduser() if path is not None else DEFAULT_CACHE_DIR
    p.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(p))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return p
