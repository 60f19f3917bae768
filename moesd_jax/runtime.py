"""Resolving the models a CLI or server runs: paths, bundled defaults, spec config.

``scripts/generate.py``, ``scripts/serve.py`` and batch jobs call :func:`load_models` so
that "no --model" means the bundled target and "--spec draft" with no "--draft" means the
bundled draft, everywhere alike.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moesd_jax.config import ConfigError, SpecConfig


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
                ngram_n: int = 2, mesh=None) -> LoadedModels:
    """Loads the target (and draft) from orbax checkpoints or HF directories.

    Args:
      model: checkpoint dir or HF dir; None = the bundled target.
      draft: draft checkpoint or HF dir; None with ``spec='draft'`` = the bundled draft.
      spec: ``none``, ``draft`` or ``ngram``; None = ``draft`` if a draft is given or the
        bundled pair is used, else ``none``.
      k: draft tokens per iteration. tree: named tree (``configs/spec``) or YAML path.
      dispatch: override the MoE dispatch backend.
      mesh: sharding strategy (name, MeshConfig or ShardingPlan): parameters are restored
        straight into their shardings, never gathered on one device first.
    """
    from moesd_jax.checkpoint import bundled_model_dir, load_model

    target_path = str(model) if model else str(bundled_model_dir("target"))
    if spec is None:
        spec = "draft" if (draft or not model) else "none"
    if spec not in ("none", "draft", "ngram"):
        raise ConfigError(f"--spec={spec!r} must be none, draft or ngram")
    if draft and spec != "draft":
        raise ConfigError(f"--draft given but --spec={spec!r}; use --spec draft")
    spec_cfg = SpecConfig(method=spec, k=k, tree=tree, ngram_n=ngram_n)
    spec_cfg.validate()
    if not Path(target_path).exists():
        raise ConfigError(f"--model {target_path!r} does not exist")
    shardings = None
    if mesh is not None:
        from moesd_jax import sharding

        shardings = sharding.as_plan(mesh).param_shardings
    target, tok = load_model(target_path, dispatch=dispatch, shardings=shardings)
    draft_model, draft_path = None, None
    if spec == "draft":
        draft_path = str(draft) if draft else str(bundled_model_dir("draft"))
        if not Path(draft_path).exists():
            raise ConfigError(f"--draft {draft_path!r} does not exist")
        draft_model, _ = load_model(draft_path, dispatch=dispatch, shardings=shardings)
        if draft_model.cfg.vocab_size != target.cfg.vocab_size:
            raise ConfigError(f"draft vocab_size={draft_model.cfg.vocab_size} != target "
                              f"vocab_size={target.cfg.vocab_size}: not the same tokenizer")
    if tok is None and not model:
        from moesd_jax.data import load_tokenizer

        tok = load_tokenizer()
    return LoadedModels(target, draft_model, tok, spec_cfg, target_path, draft_path)
