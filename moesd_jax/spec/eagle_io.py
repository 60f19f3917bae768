"""Saving and loading EAGLE-3 heads: the native layout and the public (Hugging Face) one.

Native (:func:`save_eagle`, as ``checkpoint.py`` does for models)::

  <path>/eagle_config.json  {"format": "moesd_jax_eagle", "version": 1, "eagle": EagleConfig,
                             "checksums": {param path: crc32}}   (written last)
  <path>/params/            orbax (OCDBT) checkpoint of the head's state (d2t/t2d included)

Public EAGLE-3 layout (:func:`save_eagle_hf`; vLLM / SGLang ``LlamaForCausalLMEagle3``)::

  <path>/config.json        hidden_size, intermediate_size, num_attention_heads,
                            num_key_value_heads, head_dim, rms_norm_eps, rope_theta,
                            vocab_size, draft_vocab_size, target_hidden_size,
                            norm_before_residual, eagle_config.eagle_aux_hidden_state_layer_ids
  <path>/model.safetensors  fc.weight [D, 3D], midlayer.{input_layernorm, hidden_norm,
                            post_attention_layernorm}.weight [D],
                            midlayer.self_attn.{q,k,v}_proj.weight [H*C | G*C, 2D],
                            midlayer.self_attn.o_proj.weight [D, H*C],
                            midlayer.mlp.{gate,up}_proj.weight [F, D], down_proj [D, F],
                            norm.weight [D], lm_head.weight [Vd, D],
                            d2t int64 [Vd] (target id = draft id + d2t), t2d bool [V]

torch ``Linear`` weights are ``[out, in]``: transposed on the way in and out. The public
layer ids are vLLM's ``aux_hidden_state_layers``: the *input* of layer i (= the output of
layer i - 1 here), so ``hidden_layers = ids - 1``. An ``embed_tokens.weight`` in the file
is ignored (the head uses the target's embedding). :func:`load_eagle` reads either.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from moesd_jax.checkpoint import CheckpointError, _crc, _key, write_config, write_params
from moesd_jax.config import ConfigError, from_dict, to_dict
from moesd_jax.spec.eagle import EagleConfig, EagleHead

CONFIG_NAME = "eagle_config.json"
PARAMS_DIR = "params"
FORMAT = "moesd_jax_eagle"
FORMAT_VERSION = 1
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
_NORMS = {"midlayer.input_layernorm.weight": ("input_norm", "weight"),
          "midlayer.hidden_norm.weight": ("hidden_norm", "weight"),
          "midlayer.post_attention_layernorm.weight": ("post_attn_norm", "weight"),
          "norm.weight": ("norm", "weight")}


def save_eagle(path: str | Path, head: EagleHead) -> Path:
    """Writes ``head`` in the native layout under ``path`` (replacing one there)."""
    path = Path(path).resolve()
    sums = write_params(path, head, CONFIG_NAME)
    write_config(path / CONFIG_NAME, {"format": FORMAT, "version": FORMAT_VERSION,
                                      "eagle": to_dict(head.cfg)}, sums)
    return path


def _load_native(p: Path, verify: bool) -> EagleHead:
    import orbax.checkpoint as ocp

    try:
        meta = json.loads((p / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p / CONFIG_NAME}: unreadable config ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "eagle" not in meta:
        raise CheckpointError(f"{p / CONFIG_NAME}: not a {FORMAT} config")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{p / CONFIG_NAME}: format version {meta.get('version')} "
                              f"(this library reads {FORMAT_VERSION})")
    try:
        cfg = from_dict(EagleConfig, meta["eagle"], prefix="eagle")
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{p / CONFIG_NAME}: invalid eagle config: {e}") from e
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: EagleHead(cfg, nnx.Rngs(0))))
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                          nnx.to_pure_dict(abstract))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore((p / PARAMS_DIR).resolve(), target)
    except Exception as e:  # orbax / tensorstore raise many kinds; all mean unreadable
        msg = str(e).split("\n", 1)[0][:500]
        raise CheckpointError(f"{p / PARAMS_DIR}: unreadable or mismatched array data "
                              f"({type(e).__name__}: {msg})") from e
    if verify:
        for k, v in traverse_util.flatten_dict(params).items():
            want, got = meta.get("checksums", {}).get(_key(k)), _crc(v)
            if want is not None and got is not None and want != got:
                raise CheckpointError(f"{p / PARAMS_DIR}: parameter {_key(k)} is corrupted "
                                      f"(crc32 {got}, saved as {want})")
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)


# ---------------------------------------------------------------------------------------
# the public layout


def _hf_tensors(head: EagleHead) -> dict[str, np.ndarray]:
    c = head.cfg
    f = lambda x: np.asarray(jax.device_get(x[...]), np.float32)  # noqa: E731
    x2 = 2 * c.d_model
    a = head.attn
    out = {"fc.weight": f(head.fc_KD).T,
           "midlayer.self_attn.q_proj.weight": f(a.wq_XHC).reshape(x2, -1).T,
           "midlayer.self_attn.k_proj.weight": f(a.wk_XGC).reshape(x2, -1).T,
           "midlayer.self_attn.v_proj.weight": f(a.wv_XGC).reshape(x2, -1).T,
           "midlayer.self_attn.o_proj.weight": f(a.wo_HCD).reshape(-1, c.d_model).T,
           "midlayer.mlp.gate_proj.weight": f(head.mlp.w_gate_DF).T,
           "midlayer.mlp.up_proj.weight": f(head.mlp.w_up_DF).T,
           "midlayer.mlp.down_proj.weight": f(head.mlp.w_down_FD).T,
           "lm_head.weight": f(head.lm_head_DV).T}
    for name, (mod, attr) in _NORMS.items():
        out[name] = f(getattr(getattr(head, mod), attr))
    if c.reduced:
        out["d2t"] = np.asarray(head.d2t[...], np.int64)
        out["t2d"] = np.asarray(head.t2d[...], bool)
    else:  # the identity maps, as public full-vocabulary heads ship them
        out["d2t"] = np.zeros((c.vd,), np.int64)
        out["t2d"] = np.ones((c.vocab_size,), bool)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_eagle_hf(path: str | Path, head: EagleHead) -> Path:
    """Writes ``head`` in the public EAGLE-3 layout (float32 weights)."""
    from safetensors.numpy import save_file

    c = head.cfg
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    save_file(_hf_tensors(head), str(path / HF_WEIGHTS))
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
           "hidden_size": c.d_model, "target_hidden_size": c.d_model,
           "intermediate_size": c.mlp_dim, "num_attention_heads": c.num_heads,
           "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
           "num_hidden_layers": 1, "hidden_act": "silu", "rms_norm_eps": c.rms_eps,
           "rope_theta": c.rope_theta, "vocab_size": c.vocab_size, "draft_vocab_size": c.vd,
           "tie_word_embeddings": False, "torch_dtype": "float32",
           "norm_before_residual": c.norm_before_residual,
           "eagle_config": {"use_aux_hidden_state": True,
                            "eagle_aux_hidden_state_layer_ids": [i + 1 for i in
                                                                 c.hidden_layers]}}
    (path / HF_CONFIG).write_text(json.dumps(cfg, indent=2))
    return path


def _hf_config(p: Path, target_cfg, hidden_layers) -> EagleConfig:
    try:
        raw = json.loads((p / HF_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p / HF_CONFIG}: unreadable config ({e})") from e
    need = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    missing = [k for k in need if k not in raw]
    if missing:
        raise CheckpointError(f"{p / HF_CONFIG}: missing key {missing[0]!r} (an EAGLE-3 "
                              "config.json needs " + ", ".join(need) + ")")
    if int(raw.get("num_hidden_layers", 1)) != 1:
        raise CheckpointError(f"{p / HF_CONFIG}: num_hidden_layers="
                              f"{raw['num_hidden_layers']}; only one-layer heads are supported")
    d, h = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    if hidden_layers is None:
        ids = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        if ids is not None:
            hidden_layers = tuple(int(i) - 1 for i in ids)
            if any(i < 0 for i in hidden_layers):
                raise CheckpointError(f"{p / HF_CONFIG}: eagle_aux_hidden_state_layer_ids="
                                      f"{ids} reads the embedding (id 0); not supported")
        elif target_cfg is not None:
            from moesd_jax.spec.eagle import default_hidden_layers

            hidden_layers = default_hidden_layers(target_cfg.num_layers)
        else:
            raise CheckpointError(f"{p / HF_CONFIG}: no eagle_config."
                                  "eagle_aux_hidden_state_layer_ids; pass hidden_layers or "
                                  "the target's config")
    vd = raw.get("draft_vocab_size")
    try:
        cfg = EagleConfig(
            vocab_size=int(raw["vocab_size"]), d_model=d, hidden_layers=tuple(hidden_layers),
            num_heads=h, num_kv_heads=int(raw.get("num_key_value_heads", h)),
            head_dim=int(raw.get("head_dim") or d // h), mlp_dim=int(raw["intermediate_size"]),
            draft_vocab=None if vd is None or int(vd) == int(raw["vocab_size"]) else int(vd),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
            norm_before_residual=bool(raw.get("norm_before_residual", False)))
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{p / HF_CONFIG}: {e}") from e
    if raw.get("target_hidden_size", d) != d:
        raise CheckpointError(f"{p / HF_CONFIG}: target_hidden_size="
                              f"{raw['target_hidden_size']} != hidden_size={d} (the head "
                              "shares the target's embedding)")
    return cfg


def load_eagle_hf(path: str | Path, target_cfg=None, hidden_layers=None,
                  dtype: str = "float32") -> EagleHead:
    """Loads a head in the public EAGLE-3 layout (see the module docstring).

    Args:
      path: directory with ``config.json`` and ``model.safetensors``.
      target_cfg: the target's ModelConfig: checked against the head (vocab, width,
        layers) and used for the default layers when the config names none.
      hidden_layers: override the target layers the head reads (output indices).
      dtype: parameter / compute dtype of the built head.

    Raises:
      CheckpointError: a missing file or key, or a tensor of the wrong shape (naming it).
    """
    from moesd_jax.models.hf import TensorStore

    p = Path(path)
    if not (p / HF_CONFIG).is_file():
        raise CheckpointError(f"{p}: no {HF_CONFIG} (not a public EAGLE-3 directory)")
    cfg = _hf_config(p, target_cfg, hidden_layers)
    cfg = EagleConfig(**{**to_dict(cfg), "hidden_layers": cfg.hidden_layers,
                         "param_dtype": dtype, "compute_dtype": dtype})
    try:
        store = TensorStore(p)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    d, x2, vd = cfg.d_model, 2 * cfg.d_model, cfg.vd
    h, g, c, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim

    def get(name, shape):
        if name not in store:
            raise CheckpointError(f"{p / HF_WEIGHTS}: missing tensor {name!r}")
        x = np.asarray(store.get(name))
        if tuple(x.shape) != shape:
            raise CheckpointError(f"{p / HF_WEIGHTS}: tensor {name!r} has shape "
                                  f"{tuple(x.shape)}, expected {shape}")
        return x

    lin = lambda name, out, inp: get(name, (out, inp)).astype(np.float32).T  # noqa: E731
    graphdef, state = nnx.split(nnx.eval_shape(lambda: EagleHead(cfg, nnx.Rngs(0))))
    pure = {"fc_KD": lin("fc.weight", d, 3 * d),
            "attn": {"wq_XHC": lin("midlayer.self_attn.q_proj.weight", h * c, x2)
                     .reshape(x2, h, c),
                     "wk_XGC": lin("midlayer.self_attn.k_proj.weight", g * c, x2)
                     .reshape(x2, g, c),
                     "wv_XGC": lin("midlayer.self_attn.v_proj.weight", g * c, x2)
                     .reshape(x2, g, c),
                     "wo_HCD": lin("midlayer.self_attn.o_proj.weight", d, h * c)
                     .reshape(h, c, d)},
            "mlp": {"w_gate_DF": lin("midlayer.mlp.gate_proj.weight", f, d),
                    "w_up_DF": lin("midlayer.mlp.up_proj.weight", f, d),
                    "w_down_FD": lin("midlayer.mlp.down_proj.weight", d, f)},
            "lm_head_DV": lin("lm_head.weight", vd, d)}
    for name, (mod, attr) in _NORMS.items():
        pure[mod] = {attr: get(name, (d,)).astype(np.float32)}
    if cfg.reduced:
        d2t = get("d2t", (vd,)).astype(np.int64)
        t2d = get("t2d", (cfg.vocab_size,)).astype(bool)
        tid = np.arange(vd) + d2t
        if tid.min() < 0 or tid.max() >= cfg.vocab_size or not t2d[tid].all():
            raise CheckpointError(f"{p / HF_WEIGHTS}: d2t maps draft ids outside the target "
                                  f"vocabulary [0, {cfg.vocab_size}) or off t2d")
        pure["d2t"], pure["t2d"] = d2t.astype(np.int32), t2d
    pure = jax.tree.map(jnp.asarray, pure)
    want = nnx.to_pure_dict(state)
    pure = jax.tree.map(lambda x, a: x.astype(a.dtype), pure, want)
    nnx.replace_by_pure_dict(state, pure)
    head = nnx.merge(graphdef, state)
    if target_cfg is not None:
        try:
            cfg.check_target(target_cfg)
        except ValueError as e:
            raise CheckpointError(f"{p}: {e}") from e
    return head


def cast_eagle(head: EagleHead, param_dtype: str) -> EagleHead:
    """A copy of ``head`` whose parameters are stored as ``param_dtype`` (the vocabulary
    maps stay int / bool). Bundling stores bfloat16 (half the bytes); CPU decoding casts
    back to float32 once at load (XLA:CPU bfloat16 dots are slow, and the head casts its
    weights to the compute dtype on every step otherwise)."""
    import dataclasses

    cfg = dataclasses.replace(head.cfg, param_dtype=param_dtype)
    cfg.validate()
    dt = jnp.dtype(param_dtype)
    params = jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating)
                          else a, nnx.to_pure_dict(nnx.state(head)))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: EagleHead(cfg, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)


def load_eagle(path: str | Path, target_cfg=None, *, verify: bool = True) -> EagleHead:
    """Loads a head from a native directory (``eagle_config.json``) or a public EAGLE-3
    one (``config.json`` + ``model.safetensors``); checks it against ``target_cfg``."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: EAGLE head directory does not exist")
    if (p / CONFIG_NAME).is_file():
        head = _load_native(p, verify)
        if target_cfg is not None:
            try:
                head.cfg.check_target(target_cfg)
            except ValueError as e:
                raise CheckpointError(f"{p}: {e}") from e
        return head
    if (p / HF_CONFIG).is_file():
        return load_eagle_hf(p, target_cfg)
    raise CheckpointError(f"{p}: neither {CONFIG_NAME} (native) nor {HF_CONFIG} (public "
                          "EAGLE-3 layout)")


__all__ = ["save_eagle", "save_eagle_hf", "load_eagle", "load_eagle_hf", "cast_eagle"]
