"""Parity with Hugging Face PyTorch on tiny random models of all seven architectures.

Each HF model is built once per module with transformers + torch, saved with
``save_pretrained`` and imported with :func:`moesd_jax.models.hf.load_hf_model`.
Norm weights and biases (HF initialises them to 1 / 0) are randomised so their mapping
is checked too. Forward passes are jitted over ``(graphdef, state)`` with one cache
capacity, so each architecture compiles three programs (full dense, full gather, step).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util
from safetensors.torch import save_file

from moesd_jax.models import hf as hf_lib
from moesd_jax.models.transformer import apply

transformers = pytest.importorskip("transformers")

B, T, NEW, S = 2, 17, 24, 48  # batch, prompt length, greedy tokens, cache capacity
TOL = 1e-4

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=48, initializer_range=0.15,
              max_position_embeddings=256, eos_token_id=3, pad_token_id=0)
ARCHS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=8, num_experts_per_tok=2)),
    # shared expert + sigmoid gate, qkv bias, layer 1 dense (mlp_only_layers)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40, mlp_only_layers=[1])),
    # per-head q/k norm, head_dim != d / H, normalised top-k, layer 0 dense (sparse step 2)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                       norm_topk_prob=True, head_dim=16, decoder_sparse_step=2)),
    # q/k norm over all heads, clip_qkv actually clipping
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_experts=8, num_experts_per_tok=2, clip_qkv=1.0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                   rms_norm_eps=1e-5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
}

_forward = jax.jit(apply, static_argnums=0, static_argnames=("dispatch",))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make_hf_model(arch: str, out_dir: str | Path, seed: int = 0, **overrides):
    """Builds a tiny random HF model of ``arch``, saves it to ``out_dir``, returns it."""
    cfg_name, model_name, kw = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **kw, **overrides})
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():  # HF starts norms at 1 and biases at 0: make them informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return model


def load_torch(hf_dir):
    m = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
    """Tiny torch ops on a busy 2-core machine: a second thread only spins (HF generate
    took 8.7 s with 2 threads vs 0.14 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for arch in ARCHS:
        make_hf_model(arch, root / arch)
        dirs[arch] = root / arch
    return dirs


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, COMMON["vocab_size"], (B, T))


class _Pair:
    """HF torch model, its logits on ``tokens``, and our imported model (split)."""

    def __init__(self, hf_dir: Path, tokens: np.ndarray):
        self.torch_model = load_torch(hf_dir)
        with torch.no_grad():
            self.ref = self.torch_model(torch.tensor(tokens)).logits.numpy()
        self.model = hf_lib.load_hf_model(hf_dir)
        self.graphdef, self.state = nnx.split(self.model)

    def __call__(self, toks, pos, cache, dispatch):
        return _forward(self.graphdef, self.state, jnp.asarray(toks, jnp.int32),
                        jnp.asarray(pos, jnp.int32), cache, dispatch=dispatch)


@pytest.fixture(scope="module")
def pairs(hf_dirs, tokens):
    cache: dict[str, _Pair] = {}

    def get(arch: str) -> _Pair:
        if arch not in cache:
            cache[arch] = _Pair(hf_dirs[arch], tokens)
        return cache[arch]

    return get


def _positions(b, t, start=0):
    return np.broadcast_to(np.arange(start, start + t, dtype=np.int32), (b, t))


def test_config_mapping(hf_dirs):
    cfgs = {a: hf_lib.config_from_hf(hf_lib.read_hf_config(d)) for a, d in hf_dirs.items()}
    q2 = cfgs["qwen2_moe"]
    assert q2.qkv_bias and q2.moe.shared_expert_dim == 40 and q2.moe.shared_expert_gate
    assert q2.moe.dense_layers == (1,) and q2.mlp_dim == 48 and not q2.moe.norm_topk_prob
    assert [q2.is_moe_layer(i) for i in range(2)] == [True, False]
    q3 = cfgs["qwen3_moe"]
    assert q3.qk_norm == "head" and q3.dh == 16 and q3.moe.norm_topk_prob
    assert [q3.is_moe_layer(i) for i in range(2)] == [False, True]
    assert cfgs["olmoe"].qk_norm == "all" and cfgs["olmoe"].clip_qkv == 1.0
    assert cfgs["mixtral"].moe.norm_topk_prob and cfgs["mixtral"].rope_theta == 1e6
    assert cfgs["llama"].rope_theta == 50000.0 and cfgs["llama"].rms_eps == 1e-5
    assert not cfgs["llama"].qkv_bias and cfgs["qwen2"].qkv_bias
    assert cfgs["qwen3"].tie_embeddings and cfgs["qwen3"].qk_norm == "head"
    assert all(c.eos_token_ids == (3,) for c in cfgs.values())
    # transformers 4.x layout: top-level rope_theta, eos list
    legacy = json.loads((hf_dirs["llama"] / "config.json").read_text())
    del legacy["rope_parameters"]
    legacy.update(rope_theta=1234.0, eos_token_id=[5, 6])
    cfg = hf_lib.config_from_hf(legacy)
    assert cfg.rope_theta == 1234.0 and cfg.eos_token_ids == (5, 6)


@pytest.mark.parametrize("dispatch", ["dense", "gather"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_hf(pairs, tokens, arch, dispatch):
    p = pairs(arch)
    logits, _, _ = p(tokens, _positions(B, T), p.model.init_cache(B, S), dispatch)
    assert rel_err(logits, p.ref) <= TOL, (arch, dispatch, rel_err(logits, p.ref))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_decode_matches_full_forward(pairs, tokens, arch):
    """Token-by-token decoding with the KV cache gives the full forward's logits."""
    p = pairs(arch)
    cache = p.model.init_cache(B, S)
    steps = []
    for t in range(T):
        logits, cache, _ = p(tokens[:, t:t + 1], _positions(B, 1, t), cache, "gather")
        cache = cache.replace(lengths=cache.lengths + 1)
        steps.append(np.asarray(logits))
    assert rel_err(np.concatenate(steps, axis=1), p.ref) <= TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_matches_hf_generate(pairs, tokens, arch):
    p = pairs(arch)
    tm = p.torch_model
    tm.generation_config.eos_token_id = None  # never stop early
    tm.generation_config.pad_token_id = 0
    with torch.no_grad():
        ids = torch.tensor(tokens)
        want = tm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=NEW).numpy()[:, T:]
    assert want.shape == (B, NEW)

    cache = p.model.init_cache(B, S)
    logits, cache, _ = p(tokens, _positions(B, T), cache, "gather")
    cache = cache.replace(lengths=cache.lengths + T)
    nxt = np.asarray(jnp.argmax(logits[:, -1], axis=-1))
    got = [nxt]
    for i in range(NEW - 1):
        logits, cache, _ = p(nxt[:, None], _positions(B, 1, T + i), cache, "gather")
        cache = cache.replace(lengths=cache.lengths + 1)
        nxt = np.asarray(jnp.argmax(logits[:, -1], axis=-1))
        got.append(nxt)
    np.testing.assert_array_equal(np.stack(got, axis=1), want)


def _flat_params(model):
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_fused_expert_names_and_shards(hf_dirs, tmp_path, arch):
    """transformers' in-memory layout (``experts.gate_up_proj``, Mixtral under ``mlp.``),
    written as two shards + index, imports to the same parameters."""
    sd = {k: v.contiguous() for k, v in load_torch(hf_dirs[arch]).state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, tmp_path / fname)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(hf_dirs[arch] / "config.json", tmp_path / "config.json")
    fused = _flat_params(hf_lib.load_hf_model(tmp_path))
    ref = _flat_params(hf_lib.load_hf_model(hf_dirs[arch]))
    assert fused.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(np.asarray(fused[k]), np.asarray(ref[k]), err_msg=str(k))


def test_bfloat16_tensors_and_dtype(hf_dirs, tmp_path):
    """bf16 safetensors (no numpy dtype) are read; ``dtype=bfloat16`` stores bf16 params."""
    x = torch.randn(3, 5).bfloat16()
    save_file({"x": x}, tmp_path / "model.safetensors")
    got = hf_lib.TensorStore(tmp_path).get("x")
    np.testing.assert_array_equal(np.asarray(got, np.float32), x.float().numpy())
    m = hf_lib.load_hf_model(hf_dirs["qwen3"], dtype="bfloat16")
    assert {str(v.dtype) for v in _flat_params(m).values()} == {"bfloat16"}


def test_unsupported_features_are_named(tmp_path):
    make_hf_model("llama", tmp_path, attention_bias=True)  # o_proj bias: no place for it
    with pytest.raises(ValueError, match=r"o_proj\.bias"):
        hf_lib.load_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(ValueError, match="yarn"):
        hf_lib.config_from_hf(cfg)
    cfg["model_type"] = "gpt_neox"
    with pytest.raises(ValueError, match="gpt_neox"):
        hf_lib.config_from_hf(cfg)
