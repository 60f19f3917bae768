"""Hugging Face export: a :class:`Transformer` -> transformers ``config.json`` + safetensors.

The reverse of :mod:`moesd_jax.models.hf`. The HF architecture is the first one, in the
order below, that computes the same function as the model:

  MoE    ``mixtral`` (no shared expert, every layer MoE, normalised top-k, no qkv bias),
         ``qwen2_moe`` (shared expert with sigmoid gate, ``decoder_sparse_step`` /
         ``mlp_only_layers``, q/k/v bias: zeros are written when the model has none),
         ``qwen3_moe`` (per-head q/k norm), ``olmoe`` (q/k norm over all heads, clip_qkv);
  dense  ``llama``, ``qwen2`` (q/k/v bias), ``qwen3`` (per-head q/k norm).

A feature no HF architecture has (e.g. ``clip_qkv`` on a dense model) raises ValueError
naming it. Tensors are named as transformers 5 ``save_pretrained`` writes them (experts
one by one: ``mlp.experts.{e}.gate_proj.weight``, Mixtral ``block_sparse_moe.experts.{e}.w1``).
Ours are ``[in, out]`` (attention split per head), torch ``Linear`` weights ``[out, in]``;
RoPE is HF's rotate-half convention on both sides, so q/k need no permutation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from moesd_jax.checkpoint import CONFIG_NAME, TOKENIZER_FILES, tokenizer_files
from moesd_jax.config import ModelConfig
from moesd_jax.models.transformer import Transformer

MOE_CANDIDATES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
DENSE_CANDIDATES = ("llama", "qwen2", "qwen3")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
_QK_NORM = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "all"}  # others: "none"
# ``attention_bias`` puts a bias on q, k, v and o_proj; Qwen2(-MoE) biases q/k/v always.
_ATTENTION_BIAS = ("llama", "qwen3", "qwen3_moe", "olmoe")
_QKV_BIAS_ALWAYS = ("qwen2", "qwen2_moe")


def unsupported_features(cfg: ModelConfig, model_type: str) -> list[str]:
    """Features of ``cfg`` that HF ``model_type`` cannot express (empty = exportable).

    Args:
      cfg: our model config.
      model_type: one of :data:`ARCHITECTURES`.

    Returns:
      One short description per unsupported feature, naming the config field.
    """
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} must be one of {', '.join(ARCHITECTURES)}")
    m, out = cfg.moe, []
    if (m is not None) != (model_type in MOE_CANDIDATES):
        kind = "a MoE block (dense architecture)" if m else "None (MoE architecture)"
        out.append(f"moe={kind}")
    norm = _QK_NORM.get(model_type, "none")
    if cfg.qk_norm != norm:
        out.append(f"qk_norm={cfg.qk_norm!r} ({model_type} has {norm!r})")
    if cfg.clip_qkv is not None and model_type != "olmoe":
        out.append(f"clip_qkv={cfg.clip_qkv} (only OLMoE clips q/k/v)")
    if cfg.qkv_bias and model_type in ("mixtral", "llama"):
        out.append(f"qkv_bias=True ({model_type} has no q/k/v-only bias)")
    if model_type == "olmoe" and cfg.num_heads * cfg.dh != cfg.d_model:
        out.append(f"head_dim={cfg.dh} with num_heads={cfg.num_heads} != d_model={cfg.d_model} "
                   f"(OLMoE's q/k norm spans d_model)")
    if m is None or model_type not in MOE_CANDIDATES:
        return out
    if m.shared_expert_dim and model_type != "qwen2_moe":
        out.append(f"moe.shared_expert_dim={m.shared_expert_dim} (only Qwen2-MoE has a "
                   f"shared expert)")
    if m.shared_expert_dim and not m.shared_expert_gate:
        out.append("moe.shared_expert_gate=False (Qwen2-MoE always gates its shared expert)")
    if not m.norm_topk_prob and model_type == "mixtral":
        out.append("moe.norm_topk_prob=False (Mixtral always renormalises)")
    dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    if dense and model_type in ("mixtral", "olmoe"):
        out.append(f"dense layers {dense} (moe.sparse_step={m.sparse_step}, "
                   f"moe.dense_layers={list(m.dense_layers)})")
    return out


def choose_model_type(cfg: ModelConfig) -> str:
    """The first HF architecture (see module docstring) that fits ``cfg``.

    Raises:
      ValueError: naming the features that the closest architecture lacks.
    """
    candidates = MOE_CANDIDATES if cfg.moe is not None else DENSE_CANDIDATES
    problems = {mt: unsupported_features(cfg, mt) for mt in candidates}
    for mt, p in problems.items():
        if not p:
            return mt
    best = min(candidates, key=lambda mt: len(problems[mt]))
    raise ValueError(f"no Hugging Face architecture can express this model; closest is "
                     f"{best}, which lacks: {'; '.join(problems[best])}")


def hf_config(cfg: ModelConfig, model_type: str, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg`` as HF ``model_type`` (read by transformers 4 and 5)."""
    theta = float(cfg.rope_theta)
    eos = list(cfg.eos_token_ids)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.dh,
        "intermediate_size": cfg.mlp_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_eps, "max_position_embeddings": cfg.max_seq_len,
        # transformers 5 reads rope_parameters, 4.x rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_theta": theta,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "bos_token_id": None, "pad_token_id": None,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "use_cache": True, "dtype": dtype,
    }
    if model_type in _ATTENTION_BIAS:
        hf["attention_bias"] = cfg.qkv_bias  # o_proj too: zeros written
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        hf["use_sliding_window"] = False
    m = cfg.moe
    if m is None:
        return hf
    hf["num_experts_per_tok"] = m.top_k
    if model_type == "mixtral":
        hf.update(num_local_experts=m.num_experts, intermediate_size=m.expert_dim,
                  sliding_window=None)
        return hf
    hf.update(num_experts=m.num_experts, norm_topk_prob=m.norm_topk_prob)
    if model_type == "olmoe":
        hf.update(intermediate_size=m.expert_dim, clip_qkv=cfg.clip_qkv)
        return hf
    hf.update(moe_intermediate_size=m.expert_dim, decoder_sparse_step=m.sparse_step,
              mlp_only_layers=sorted(m.dense_layers))
    if model_type == "qwen2_moe":
        hf.update(qkv_bias=True, shared_expert_intermediate_size=m.shared_expert_dim)
    return hf


def _t(w_IO: np.ndarray) -> np.ndarray:
    """Ours ``[in, out]`` -> torch Linear ``[out, in]``."""
    return np.ascontiguousarray(w_IO.T)


def _attention(a: dict[str, Any], p: str, cfg: ModelConfig, model_type: str) -> dict:
    d, h, g, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dh
    out = {}
    for w_name, b_name, theirs, heads in (("wq_DHK", "bq_HK", "q_proj", h),
                                          ("wk_DGK", "bk_GK", "k_proj", g),
                                          ("wv_DGK", "bv_GK", "v_proj", g)):
        out[f"{p}.{theirs}.weight"] = _t(a[w_name].reshape(d, heads * dh))
        if cfg.qkv_bias or model_type in _QKV_BIAS_ALWAYS:
            bias = a[b_name] if cfg.qkv_bias else np.zeros((heads, dh), np.float32)
            out[f"{p}.{theirs}.bias"] = bias.reshape(heads * dh)
    out[f"{p}.o_proj.weight"] = _t(a["wo_HKD"].reshape(h * dh, d))
    if cfg.qkv_bias and model_type in _ATTENTION_BIAS:
        out[f"{p}.o_proj.bias"] = np.zeros((d,), np.float32)
    if cfg.qk_norm != "none":
        out[f"{p}.q_norm.weight"] = a["q_norm"]["weight"]
        out[f"{p}.k_norm.weight"] = a["k_norm"]["weight"]
    return out


def _mlp(w: dict[str, Any], p: str) -> dict[str, np.ndarray]:
    return {f"{p}.gate_proj.weight": _t(w["w_gate_DF"]), f"{p}.up_proj.weight": _t(w["w_up_DF"]),
            f"{p}.down_proj.weight": _t(w["w_down_FD"])}


def _moe(w: dict[str, Any], p: str, cfg: ModelConfig, model_type: str) -> dict:
    m = cfg.moe
    if model_type == "mixtral":
        p, names = p.replace(".mlp", ".block_sparse_moe"), ("w1", "w3", "w2")
    else:
        names = ("gate_proj", "up_proj", "down_proj")
    out = {f"{p}.gate.weight": _t(w["router_DE"])}
    for e in range(m.num_experts):
        out[f"{p}.experts.{e}.{names[0]}.weight"] = _t(w["w_gate_EDF"][e])
        out[f"{p}.experts.{e}.{names[1]}.weight"] = _t(w["w_up_EDF"][e])
        out[f"{p}.experts.{e}.{names[2]}.weight"] = _t(w["w_down_EFD"][e])
    if m.shared_expert_dim:
        out.update(_mlp(w["shared"], f"{p}.shared_expert"))
        out[f"{p}.shared_expert_gate.weight"] = _t(w["shared_gate_D1"])
    elif model_type == "qwen2_moe":  # a width-0 shared expert: it adds exactly zero
        d = cfg.d_model
        out.update({f"{p}.shared_expert.gate_proj.weight": np.zeros((0, d), np.float32),
                    f"{p}.shared_expert.up_proj.weight": np.zeros((0, d), np.float32),
                    f"{p}.shared_expert.down_proj.weight": np.zeros((d, 0), np.float32),
                    f"{p}.shared_expert_gate.weight": np.zeros((1, d), np.float32)})
    return out


def hf_tensors(model: Transformer, model_type: str) -> dict[str, np.ndarray]:
    """HF tensor name -> float32 numpy array (torch layout) for ``model`` as ``model_type``."""
    cfg = model.cfg
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32),
                          nnx.to_pure_dict(nnx.state(model)))
    out = {"model.embed_tokens.weight": params["embed"]["embedding_VD"],
           "model.norm.weight": params["final_norm"]["weight"]}
    for i in range(cfg.num_layers):
        layer, p = params["layers"][i], f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = layer["attn_norm"]["weight"]
        out[f"{p}.post_attention_layernorm.weight"] = layer["ffn_norm"]["weight"]
        out.update(_attention(layer["attn"], f"{p}.self_attn", cfg, model_type))
        if cfg.is_moe_layer(i):
            out.update(_moe(layer["moe"], f"{p}.mlp", cfg, model_type))
        else:
            out.update(_mlp(layer["mlp"], f"{p}.mlp"))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _t(params["lm_head_DV"])
    return out


def export_hf(model: Transformer, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
              dtype: str = "float32", model_type: str | None = None) -> Path:
    """Writes ``model`` as a Hugging Face directory loadable by ``AutoModelForCausalLM``.

    Args:
      model: the model (parameters fully addressable by this process).
      out_dir: directory to write ``config.json`` and ``model.safetensors`` into (created;
        files of an earlier export there are replaced).
      tokenizer_dir: directory whose tokenizer files (``checkpoint.TOKENIZER_FILES``) are
        copied next to the weights; None = no tokenizer.
      dtype: tensor dtype in the file: ``float32``, ``bfloat16`` or ``float16``.
      model_type: HF architecture to write (see :data:`ARCHITECTURES`); None = the first
        that fits (:func:`choose_model_type`).

    Returns:
      The absolute output directory.

    Raises:
      ValueError: a feature the architecture cannot express (named), a bad ``dtype``,
        a tokenizer directory without tokenizer files, or ``out_dir`` holding a moesd_jax
        checkpoint or a sharded (index) HF checkpoint.
    """
    cfg = model.cfg
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {', '.join(EXPORT_DTYPES)}")
    if model_type is None:
        model_type = choose_model_type(cfg)
    problems = unsupported_features(cfg, model_type)
    if problems:
        raise ValueError(f"cannot export as {model_type}: {'; '.join(problems)}")
    if tokenizer_dir is not None and not tokenizer_files(tokenizer_dir):
        raise ValueError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    out = Path(out_dir).resolve()
    if (out / CONFIG_NAME).exists():  # its loader would take the new config.json for HF's
        raise ValueError(f"{out}: is a moesd_jax checkpoint; export into another directory")
    if (out / "model.safetensors.index.json").exists():  # would shadow model.safetensors
        raise ValueError(f"{out}: holds a sharded checkpoint (model.safetensors.index.json); "
                         f"export into an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # absent until the weights are complete
    np_dtype = np.dtype(jnp.dtype(dtype))
    tensors = {k: np.ascontiguousarray(v.astype(np_dtype))
               for k, v in hf_tensors(model, model_type).items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for f in tokenizer_files(tokenizer_dir):
            shutil.copy2(f, out / f.name)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, model_type, dtype), indent=2))
    return out
