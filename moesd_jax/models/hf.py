"""Hugging Face checkpoint import: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Llama, Qwen2, Qwen3.

Reads a LOCAL directory holding ``config.json`` and ``model.safetensors`` (or the shards
named by ``model.safetensors.index.json``) and builds a :class:`Transformer` with the same
function: float32 logits match HF PyTorch to ~1e-6 relative on random tiny models
(``tests/models/test_hf_parity.py``).

Tensor names accepted per layer ``model.layers.{i}``:
  attention  ``self_attn.{q,k,v,o}_proj.weight`` (+ ``.bias`` for q/k/v), optional
             ``self_attn.{q,k}_norm.weight`` (per head: Qwen3; all heads: OLMoE);
  dense FFN  ``mlp.{gate,up,down}_proj.weight``;
  MoE FFN    router ``{mlp|block_sparse_moe}.gate.weight`` and experts either per expert,
             as transformers 5 ``save_pretrained`` writes them (``experts.{e}.w1/w3/w2`` =
             gate/up/down for Mixtral, ``experts.{e}.{gate,up,down}_proj.weight`` for the
             others), or fused, as transformers 5 holds them in memory
             (``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``);
             Qwen2-MoE adds ``shared_expert.*`` and ``shared_expert_gate.weight``.
torch ``Linear`` weights are ``[out, in]``; ours are ``[in, out]`` (split per head for
attention), hence the transposes below.
"""

from __future__ import annotations

import json
import struct
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util
from safetensors import safe_open

from moesd_jax.config import Dispatch, ModelConfig, MoEConfig
from moesd_jax.models.transformer import Transformer

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama", "qwen2", "qwen3")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# Default KV-cache capacity of an imported model (HF's max_position_embeddings is often
# 32k-128k, far more cache than a default should allocate); ``init_cache(b, max_len)``
# asks for more.
DEFAULT_MAX_SEQ_LEN = 4096


_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size")
_REQUIRED_MOE = ("num_experts_per_tok",)


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta`` (4.x)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(
                f"rope_type={kind!r} is not supported (only the default RoPE); "
                f"model_type={hf.get('model_type')!r}"
            )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def config_from_hf(hf: dict[str, Any], *, dispatch: str | None = None,
                   dtype: str | None = None) -> ModelConfig:
    """Maps a HF ``config.json`` dict onto :class:`ModelConfig`.

    Args:
      hf: the parsed ``config.json``.
      dispatch: MoE dispatch backend to store in the config (None = MoEConfig default).
      dtype: parameter storage dtype (None = float32; compute stays float32).

    Returns:
      The validated ModelConfig.

    Raises:
      ValueError: unsupported ``model_type``, activation, RoPE scaling or MLP bias.
    """
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type={mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if dispatch is not None and dispatch not in typing.get_args(Dispatch):
        raise ValueError(f"dispatch={dispatch!r} must be one of {typing.get_args(Dispatch)}")
    absent = [k for k in _REQUIRED + (_REQUIRED_MOE if mt in MOE_MODEL_TYPES else ())
              if hf.get(k) is None]
    if absent:
        raise ValueError(f"model_type={mt!r}: config.json lacks {', '.join(absent)}")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"model_type={mt!r}: hidden_act={act!r} is not supported (only silu)")
    if hf.get("mlp_bias"):
        raise ValueError(f"model_type={mt!r}: mlp_bias=True is not supported")
    d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or d // h
    if mt in ("qwen2", "qwen2_moe"):  # q/k/v always biased in Qwen2 (o_proj never)
        qkv_bias = bool(hf.get("qkv_bias", True))
    else:
        qkv_bias = bool(hf.get("attention_bias", False))
    qk_norm = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "all"}.get(mt, "none")

    # Sliding-window attention equals full attention while the cache fits in the window,
    # so an imported model's default cache never exceeds the window.
    max_len = min(int(hf.get("max_position_embeddings", DEFAULT_MAX_SEQ_LEN)),
                  DEFAULT_MAX_SEQ_LEN)
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window", mt == "mixtral") and window:
        max_len = min(max_len, int(window))

    moe = None
    mlp_dim = int(hf["intermediate_size"])
    if mt in MOE_MODEL_TYPES:
        # Qwen3-MoE as saved by transformers 5 writes num_local_experts, older files
        # num_experts (Qwen2-MoE, OLMoE too); Mixtral always num_local_experts.
        e = hf.get("num_experts") or hf.get("num_local_experts")
        if not e:
            raise ValueError(f"model_type={mt!r}: config.json lacks num_experts")
        expert_dim = hf.get("moe_intermediate_size") or hf["intermediate_size"]
        shared = int(hf.get("shared_expert_intermediate_size") or 0) if mt == "qwen2_moe" else 0
        moe = MoEConfig(
            num_experts=int(e),
            top_k=int(hf["num_experts_per_tok"]),
            expert_dim=int(expert_dim),
            norm_topk_prob=True if mt == "mixtral" else bool(hf.get("norm_topk_prob", False)),
            shared_expert_dim=shared,
            shared_expert_gate=shared > 0,
            sparse_step=int(hf.get("decoder_sparse_step") or 1),
            dense_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()),
            **({"dispatch": dispatch} if dispatch is not None else {}),
        )
    cfg = ModelConfig(
        arch=mt,
        vocab_size=int(hf["vocab_size"]),
        d_model=d,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=h,
        num_kv_heads=int(hf.get("num_key_value_heads") or h),
        head_dim=int(head_dim),
        mlp_dim=mlp_dim,
        rope_theta=_rope_theta(hf),
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qk_norm=qk_norm,
        qkv_bias=qkv_bias,
        clip_qkv=None if hf.get("clip_qkv") is None else float(hf["clip_qkv"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=max_len,
        param_dtype=dtype or "float32",
        moe=moe,
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
    )
    cfg.validate()
    return cfg


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of ``hf_dir``; EOS ids from ``generation_config.json`` are added."""
    hf_dir = Path(hf_dir)
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    with open(path) as f:
        hf = json.load(f)
    gen = hf_dir / "generation_config.json"
    if gen.is_file():
        with open(gen) as f:
            extra = _eos_ids(json.load(f).get("eos_token_id"))
        ids = list(_eos_ids(hf.get("eos_token_id")))
        ids += [i for i in extra if i not in ids]
        hf["eos_token_id"] = ids or None
    return hf


# ---------------------------------------------------------------------------------------
# safetensors reading


class TensorStore:
    """Name -> numpy array over one or several safetensors files (lazy, read on demand)."""

    def __init__(self, hf_dir: str | Path):
        hf_dir = Path(hf_dir)
        index = hf_dir / "model.safetensors.index.json"
        single = hf_dir / "model.safetensors"
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {k: hf_dir / v for k, v in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="np") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise ValueError(
                f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json found"
            )
        for p in set(self.files.values()):
            if not p.is_file():
                raise ValueError(f"{hf_dir}: shard {p.name} named by the index is missing")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> np.ndarray:
        path = self.files[name]
        with safe_open(path, framework="np") as f:
            try:
                return f.get_tensor(name)
            except TypeError:  # bfloat16 etc.: numpy has no such dtype, read the bytes
                return _read_raw(path, name)


_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
               "F8_E5M2": ml_dtypes.float8_e5m2}


def _read_raw(path: Path, name: str) -> np.ndarray:
    """Reads one tensor straight from the safetensors layout (8-byte header size, JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(n))[name]
        dt = _RAW_DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        buf = f.read(end - start)
    return np.frombuffer(buf, dtype=dt).reshape(info["shape"])


# ---------------------------------------------------------------------------------------
# name mapping


class _Reader:
    """Collects tensors by name, remembering which were missing and which were used."""

    def __init__(self, store: TensorStore):
        self.store = store
        self.missing: list[str] = []
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.store

    def __call__(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        if name not in self.store:
            self.missing.append(name)
            return None
        self.used.add(name)
        x = np.asarray(self.store.get(name), dtype=np.float32)
        if shape is not None and tuple(x.shape) != tuple(shape):
            raise ValueError(f"tensor {name} has shape {list(x.shape)}, expected {list(shape)}")
        return x


def _linear(r: _Reader, name: str, n_in: int, n_out: int) -> np.ndarray | None:
    """torch Linear weight [out, in] -> [in, out]."""
    w = r(name, (n_out, n_in))
    return None if w is None else w.T


def _attention(r: _Reader, p: str, cfg: ModelConfig) -> dict[str, Any]:
    d, h, g, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dh
    out: dict[str, Any] = {}
    for w_name, b_name, theirs, heads in (("wq_DHK", "bq_HK", "q_proj", h),
                                          ("wk_DGK", "bk_GK", "k_proj", g),
                                          ("wv_DGK", "bv_GK", "v_proj", g)):
        w = _linear(r, f"{p}.{theirs}.weight", d, heads * dh)
        out[w_name] = None if w is None else w.reshape(d, heads, dh)
        if cfg.qkv_bias:
            b = r(f"{p}.{theirs}.bias", (heads * dh,))
            out[b_name] = None if b is None else b.reshape(heads, dh)
    wo = _linear(r, f"{p}.o_proj.weight", h * dh, d)
    out["wo_HKD"] = None if wo is None else wo.reshape(h, dh, d)
    if cfg.qk_norm != "none":
        nq, nk = (dh, dh) if cfg.qk_norm == "head" else (h * dh, g * dh)
        out["q_norm"] = {"weight": r(f"{p}.q_norm.weight", (nq,))}
        out["k_norm"] = {"weight": r(f"{p}.k_norm.weight", (nk,))}
    return out


def _mlp(r: _Reader, p: str, d: int, f: int) -> dict[str, Any]:
    return {
        "w_gate_DF": _linear(r, f"{p}.gate_proj.weight", d, f),
        "w_up_DF": _linear(r, f"{p}.up_proj.weight", d, f),
        "w_down_FD": _linear(r, f"{p}.down_proj.weight", f, d),
    }


def _experts(r: _Reader, p: str, d: int, f: int, e: int):
    """(w_gate_EDF, w_up_EDF, w_down_EFD) from per-expert or fused tensors."""
    if r.has(f"{p}.experts.gate_up_proj"):  # fused, transformers 5 in-memory layout
        gu = r(f"{p}.experts.gate_up_proj", (e, 2 * f, d))
        down = r(f"{p}.experts.down_proj", (e, d, f))
        # chunk(2) of the output dim: the first F rows are gate, the next F are up.
        return (gu[:, :f].transpose(0, 2, 1), gu[:, f:].transpose(0, 2, 1),
                None if down is None else down.transpose(0, 2, 1))
    if r.has(f"{p}.experts.0.w1.weight"):  # Mixtral: w1 = gate, w3 = up, w2 = down
        names = ("w1", "w3", "w2")
    else:
        names = ("gate_proj", "up_proj", "down_proj")
    gate = [_linear(r, f"{p}.experts.{i}.{names[0]}.weight", d, f) for i in range(e)]
    up = [_linear(r, f"{p}.experts.{i}.{names[1]}.weight", d, f) for i in range(e)]
    down = [_linear(r, f"{p}.experts.{i}.{names[2]}.weight", f, d) for i in range(e)]
    stack = lambda ws: None if any(w is None for w in ws) else np.stack(ws)
    return stack(gate), stack(up), stack(down)


def _moe(r: _Reader, p: str, cfg: ModelConfig) -> dict[str, Any]:
    m, d = cfg.moe, cfg.d_model
    out: dict[str, Any] = {"router_DE": _linear(r, f"{p}.gate.weight", d, m.num_experts)}
    out["w_gate_EDF"], out["w_up_EDF"], out["w_down_EFD"] = _experts(
        r, p, d, m.expert_dim, m.num_experts)
    if m.shared_expert_dim:
        out["shared"] = _mlp(r, f"{p}.shared_expert", d, m.shared_expert_dim)
        if m.shared_expert_gate:
            out["shared_gate_D1"] = _linear(r, f"{p}.shared_expert_gate.weight", d, 1)
    return out


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    """Unused tensors that do not change the function."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if cfg.tie_embeddings and name == "lm_head.weight":  # HF ties it to the embedding too
        return True
    # Qwen2-MoE with shared_expert_intermediate_size=0: the shared expert outputs zeros.
    return "shared_expert" in name and cfg.moe is not None and not cfg.moe.shared_expert_dim


def hf_params(store: TensorStore, cfg: ModelConfig) -> dict[str, Any]:
    """Our parameter tree (nested dict of float32 numpy arrays) from HF tensors.

    Raises:
      ValueError: listing every missing tensor, or tensors the model has no place for
        (e.g. a non-zero ``o_proj.bias``).
    """
    r = _Reader(store)
    d = cfg.d_model
    layers: dict[int, Any] = {}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        layer: dict[str, Any] = {
            "attn_norm": {"weight": r(f"{p}.input_layernorm.weight", (d,))},
            "ffn_norm": {"weight": r(f"{p}.post_attention_layernorm.weight", (d,))},
            "attn": _attention(r, f"{p}.self_attn", cfg),
        }
        if cfg.is_moe_layer(i):
            moe_p = (f"{p}.block_sparse_moe" if r.has(f"{p}.block_sparse_moe.gate.weight")
                     else f"{p}.mlp")
            layer["moe"] = _moe(r, moe_p, cfg)
        else:
            layer["mlp"] = _mlp(r, f"{p}.mlp", d, cfg.mlp_dim)
        layers[i] = layer
    params: dict[str, Any] = {
        "embed": {"embedding_VD": r("model.embed_tokens.weight", (cfg.vocab_size, d))},
        "final_norm": {"weight": r("model.norm.weight", (d,))},
        "layers": layers,
    }
    if not cfg.tie_embeddings:
        params["lm_head_DV"] = _linear(r, "lm_head.weight", d, cfg.vocab_size)
    if r.missing:
        shown = ", ".join(r.missing[:20])
        more = f" (and {len(r.missing) - 20} more)" if len(r.missing) > 20 else ""
        raise ValueError(
            f"model_type={cfg.arch!r}: {len(r.missing)} tensor(s) missing from the "
            f"checkpoint: {shown}{more}"
        )
    # Anything left over must be a harmless extra (RoPE buffers, all-zero biases):
    # silently dropping a real weight would give a different model.
    extra = [k for k in store.keys() if k not in r.used and not _ignorable(k, cfg)
             and np.any(np.asarray(store.get(k), np.float32) != 0)]
    if extra:
        raise ValueError(
            f"model_type={cfg.arch!r}: checkpoint tensors not supported by this model: "
            f"{', '.join(extra[:20])}"
        )
    return params


def load_hf_model(hf_dir: str | Path, dispatch: str | None = None,
                  dtype: str | None = None) -> Transformer:
    """Builds a :class:`Transformer` from a local HF directory.

    Args:
      hf_dir: directory with ``config.json`` and safetensors weights.
      dispatch: MoE dispatch backend stored in the config (None = default ``gather``).
      dtype: parameter dtype, ``float32`` (default) or ``bfloat16``.

    Returns:
      The model, with ``model.cfg`` mapped by :func:`config_from_hf`.

    Raises:
      ValueError: unsupported model_type / options, or missing tensors (named).
    """
    hf = read_hf_config(hf_dir)
    store = TensorStore(hf_dir)
    if "tie_word_embeddings" not in hf:  # old configs: infer from the weights
        hf["tie_word_embeddings"] = "lm_head.weight" not in store
    cfg = config_from_hf(hf, dispatch=dispatch, dtype=dtype)
    params = hf_params(store, cfg)
    return build_model(cfg, params)


def build_model(cfg: ModelConfig, params: dict[str, Any]) -> Transformer:
    """A Transformer whose parameters are ``params`` (no random init of the full model)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    want = nnx.to_pure_dict(state)
    flat_want = traverse_util.flatten_dict(want)
    flat_have = traverse_util.flatten_dict(params)
    if set(flat_want) != set(flat_have):
        raise ValueError(
            f"parameter tree mismatch: missing {sorted(set(flat_want) - set(flat_have))}, "
            f"unexpected {sorted(set(flat_have) - set(flat_want))}"
        )
    for k, spec in flat_want.items():
        if tuple(flat_have[k].shape) != tuple(spec.shape):
            raise ValueError(f"parameter {'/'.join(map(str, k))}: shape "
                             f"{flat_have[k].shape} != {spec.shape}")
    dt = jnp.dtype(cfg.param_dtype)
    values = jax.tree.map(lambda x: jnp.asarray(x, dtype=dt), params)
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def load_hf_tokenizer(hf_dir: str | Path):
    """``AutoTokenizer`` of ``hf_dir``, or None when it holds no tokenizer files."""
    hf_dir = Path(hf_dir)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((hf_dir / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))
