"""Orbax checkpoints of a model (params + config + tokenizer) and the bundled-model lookup.

Layout of a checkpoint directory written by :func:`save_checkpoint`::

  <path>/moesd_config.json   {"format": "moesd_jax", "version": 1, "model": ModelConfig,
                              "checksums": {param path: crc32 of its bytes}}
  <path>/params/             orbax (OCDBT) checkpoint of the parameter tree
  <path>/tokenizer/          tokenizer files copied from ``tokenizer_dir`` (optional)

The config is written last, so an interrupted save leaves a directory that
:func:`load_model` rejects. :func:`load_model` also takes a Hugging Face directory
(``config.json`` with ``model_type``) and imports it with :mod:`moesd_jax.models.hf`.
The CRC32 per parameter catches corruption that the storage layer reads back without
complaint (a flipped byte inside an uncompressed chunk).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from moesd_jax.config import ConfigError, Dispatch, ModelConfig, from_dict, to_dict
from moesd_jax.models.transformer import Transformer

CONFIG_NAME = "moesd_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json",
)
BUNDLED_ROOT = Path(__file__).resolve().parent / "bundled"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupted; the message names path and cause."""


def bundled_model_dir(which: str = "target") -> Path:
    """``moesd_jax/bundled/<which>``: the packaged default target, draft model or EAGLE
    head (``eagle``)."""
    if which not in ("target", "draft", "eagle"):
        raise ValueError(f"which={which!r} must be 'target', 'draft' or 'eagle'")
    return BUNDLED_ROOT / which


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The tokenizer files (:data:`TOKENIZER_FILES`) present in ``directory``."""
    d = Path(directory)
    return [d / n for n in TOKENIZER_FILES if (d / n).is_file()]


def _key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _crc(x: jax.Array) -> str | None:
    """CRC32 of an array's bytes, or None when this process does not hold all of it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
    return f"{zlib.crc32(a.view(np.uint8).reshape(-1)):08x}"


def save_checkpoint(path: str | Path, model: Transformer,
                    tokenizer_dir: str | Path | None = None) -> Path:
    """Writes ``model``'s parameters and config (and tokenizer files) under ``path``.

    Args:
      path: checkpoint directory (created; an existing checkpoint there is replaced).
      model: the model; its parameters may be sharded (orbax writes each process's shards).
      tokenizer_dir: directory whose tokenizer files are copied into ``path/tokenizer``.

    Returns:
      The absolute checkpoint path.
    """
    path = Path(path).resolve()
    if tokenizer_dir is not None and not tokenizer_files(tokenizer_dir):
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    primary = jax.process_index() == 0
    checksums = write_params(path, model, CONFIG_NAME, primary)
    if primary:
        tok = path / TOKENIZER_DIR
        if tok.exists():
            shutil.rmtree(tok)
        if tokenizer_dir is not None:
            tok.mkdir()
            for f in tokenizer_files(tokenizer_dir):
                shutil.copy2(f, tok / f.name)
        write_config(path / CONFIG_NAME, {"format": "moesd_jax", "version": FORMAT_VERSION,
                                          "model": to_dict(model.cfg)}, checksums)
    return path


def write_params(path: Path, module, config_name: str, primary: bool = True) -> dict:
    """The first half of writing a checkpoint directory: removes its config file (the
    directory reads as incomplete until :func:`write_config` puts it back) and saves
    ``module``'s state under ``params/`` with orbax. Returns the per-array checksums."""
    import orbax.checkpoint as ocp

    if primary:
        path.mkdir(parents=True, exist_ok=True)
        (path / config_name).unlink(missing_ok=True)
    params = nnx.to_pure_dict(nnx.state(module))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_DIR, params, force=True)
        ckptr.wait_until_finished()
    return {_key(k): _crc(v) for k, v in traverse_util.flatten_dict(params).items()}


def write_config(path: Path, meta: dict, checksums: dict) -> None:
    """The second half: ``meta`` plus the checksums, written atomically to ``path``."""
    meta = {**meta, "checksums": {k: v for k, v in checksums.items() if v is not None}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(path)


def _is_hf_dir(p: Path) -> bool:
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def _with_dispatch(cfg: ModelConfig, dispatch: str | None) -> ModelConfig:
    if dispatch is not None and dispatch not in typing.get_args(Dispatch):
        raise ValueError(f"dispatch={dispatch!r} must be one of {typing.get_args(Dispatch)}")
    if dispatch is None or cfg.moe is None:
        return cfg
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch=dispatch))


def _restore_target(abstract_state: nnx.State, shardings: Any) -> dict:
    """Pure-dict tree of ShapeDtypeStruct(sharding=...) for orbax's abstract restore."""
    pure = nnx.to_pure_dict(abstract_state)
    if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
        shardings = shardings(abstract_state)  # e.g. ShardingPlan.param_shardings
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, pure)
    elif isinstance(shardings, nnx.State):
        shardings = nnx.to_pure_dict(shardings)
    flat_a = traverse_util.flatten_dict(pure)
    flat_s = traverse_util.flatten_dict(shardings)
    if set(flat_a) != set(flat_s):
        missing = sorted(_key(k) for k in set(flat_a) - set(flat_s))
        extra = sorted(_key(k) for k in set(flat_s) - set(flat_a))
        raise ValueError(f"shardings do not match the parameter tree: missing {missing}, "
                         f"unexpected {extra}")
    target = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=flat_s[k])
              for k, a in flat_a.items()}
    return traverse_util.unflatten_dict(target)


def _read_meta(p: Path) -> dict[str, Any]:
    try:
        meta = json.loads((p / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p / CONFIG_NAME}: unreadable config ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != "moesd_jax" or "model" not in meta:
        raise CheckpointError(f"{p / CONFIG_NAME}: not a moesd_jax checkpoint config")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{p / CONFIG_NAME}: format version {meta.get('version')} "
                              f"(this library reads {FORMAT_VERSION})")
    return meta


def tokenizer_dir(path: str | Path) -> Path | None:
    """A checkpoint's tokenizer directory: ``<ckpt>/tokenizer/``, or the directory named
    by the config's ``"tokenizer"`` key, relative to the checkpoint (the bundled pair
    shares ``bundled/tokenizer``); None when it has neither.

    Raises:
      CheckpointError: the config names a directory that does not exist.
    """
    p = Path(path)
    d = p / TOKENIZER_DIR
    if d.is_dir():
        return d
    try:
        meta = json.loads((p / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    ref = meta.get("tokenizer") if isinstance(meta, dict) else None
    if not isinstance(ref, str):
        return None
    d = (p / ref).resolve()
    if not d.is_dir():
        raise CheckpointError(f"{p / CONFIG_NAME}: tokenizer={ref!r} is not a directory ({d})")
    return d


def _load_tokenizer(p: Path):
    from moesd_jax.models.hf import load_hf_tokenizer

    d = tokenizer_dir(p)
    return load_hf_tokenizer(d) if d is not None else None


def load_model(path_or_hf_dir: str | Path, *, dispatch: str | None = None,
               shardings: Any = None, verify: bool = True, param_dtype: str | None = None):
    """Loads a checkpoint written by :func:`save_checkpoint`, or a Hugging Face directory.

    Args:
      path_or_hf_dir: a checkpoint directory, or a HF directory (``config.json`` with
        ``model_type`` + safetensors).
      dispatch: override the MoE dispatch backend stored in the config.
      shardings: where the parameters go: None (first device), one ``Sharding`` for all,
        or a pytree of Shardings matching ``nnx.state(model)`` (an ``nnx.State`` or its
        pure dict), or a callable mapping the abstract state to such a pytree (e.g.
        ``ShardingPlan.param_shardings``). Checkpoints are restored straight into these
        shardings; HF weights are ``device_put`` after import.
      verify: compare each restored parameter with the CRC32 stored at save time.
      param_dtype: cast the parameters once at load (after verification) and record it in
        the config, e.g. ``"float32"`` on CPU, where bf16 dots run far slower than f32:
        the weights are then resident once, in the dtype the forward computes in, instead
        of being cast on every step. None keeps the stored dtype.

    Returns:
      (model, tokenizer or None).

    Raises:
      CheckpointError: missing directory, missing/invalid config, unreadable,
        truncated or corrupted array data, or a HF import failure (all naming the path).
    """
    p = Path(path_or_hf_dir)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint directory does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory")
    if _is_hf_dir(p):
        from moesd_jax.models import hf

        try:
            model = hf.load_hf_model(p, dispatch=dispatch)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{p}: {e}") from e
        if shardings is not None:
            graphdef, state = nnx.split(model)
            target = _restore_target(state, shardings)
            placed = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding),
                                  nnx.to_pure_dict(state), target)
            nnx.replace_by_pure_dict(state, placed)
            model = nnx.merge(graphdef, state)
        return model, hf.load_hf_tokenizer(p)
    if not (p / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{p}: no {CONFIG_NAME} (not a moesd_jax checkpoint, or its save did not "
            f"finish) and no config.json with model_type (not a Hugging Face directory)"
        )
    meta = _read_meta(p)
    try:
        cfg = from_dict(ModelConfig, meta["model"], prefix="model")
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{p / CONFIG_NAME}: invalid model config: {e}") from e
    cfg = _with_dispatch(cfg, dispatch)
    stored_dtype = cfg.param_dtype
    if param_dtype is not None:
        cfg = dataclasses.replace(cfg, param_dtype=param_dtype)
        cfg.validate()
    params_dir = p / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{p}: parameter directory {PARAMS_DIR}/ is missing")

    import orbax.checkpoint as ocp

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    stored_cfg = dataclasses.replace(cfg, param_dtype=stored_dtype)
    stored_state = nnx.state(nnx.eval_shape(lambda: Transformer(stored_cfg, nnx.Rngs(0))))
    target = _restore_target(stored_state, shardings)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(params_dir.resolve(), target)
    except Exception as e:  # orbax / tensorstore raise many kinds; all mean unreadable
        msg = str(e).split("\n", 1)[0][:500]
        raise CheckpointError(
            f"{params_dir}: unreadable, truncated or mismatched array data "
            f"({type(e).__name__}: {msg})"
        ) from e
    if verify:
        stored = meta.get("checksums", {})
        for k, v in traverse_util.flatten_dict(params).items():
            want, got = stored.get(_key(k)), _crc(v)
            if want is not None and got is not None and want != got:
                raise CheckpointError(
                    f"{params_dir}: parameter {_key(k)} is corrupted (crc32 {got}, "
                    f"saved as {want})"
                )
    if param_dtype is not None:
        want = nnx.to_pure_dict(abstract)
        params = jax.tree.map(lambda x, a: x.astype(a.dtype), params, want)
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract), _load_tokenizer(p)
