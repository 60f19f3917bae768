"""Export to Hugging Face (``moesd_jax.models.hf_export``), checked against transformers.

The bundled target (MoE with a gated shared expert -> Qwen2-MoE) and draft (dense ->
Llama), and tiny random models of the other architectures, are exported, loaded with
``AutoModelForCausalLM`` and compared on float32 logits; importing the export back gives
the same parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util
from safetensors import safe_open

from moesd_jax.checkpoint import bundled_model_dir, load_model, tokenizer_dir
from moesd_jax.models.hf import build_model, load_hf_model
from moesd_jax.models.hf_export import choose_model_type, export_hf
from moesd_jax.models.transformer import Transformer, apply
from tests.helpers import dense_cfg, moe_cfg

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
B, T = 2, 16
TOL = 1e-4

# dense dispatch: the float32 reference backend, and the quickest to compile
_forward = jax.jit(functools.partial(apply, dispatch="dense"), static_argnums=0)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
    """Tiny torch ops on a busy 2-core machine: a second thread only spins."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def our_logits(model, tokens_BT: np.ndarray) -> np.ndarray:
    graphdef, state = nnx.split(model)
    pos_BT = np.broadcast_to(np.arange(tokens_BT.shape[1], dtype=np.int32), tokens_BT.shape)
    logits, _, _ = _forward(graphdef, state, jnp.asarray(tokens_BT, jnp.int32),
                            jnp.asarray(pos_BT), model.init_cache(*tokens_BT.shape))
    return np.asarray(logits)


def hf_logits(hf_dir: Path, tokens_BT: np.ndarray):
    """(logits of ``hf_dir`` loaded by transformers, the torch model's class name)."""
    m = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor(tokens_BT)).logits.numpy(), type(m).__name__


def flat_params(model) -> dict:
    return {k: np.asarray(v, np.float32) for k, v in
            traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


def random_model(cfg, seed: int = 0):
    """A model of ``cfg`` with numpy-random parameters (faster than jax init on a busy
    CPU); norm weights and biases are random too, so that their mapping is checked."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    params = {}
    for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items():
        x = rng.standard_normal(v.shape).astype(np.float32)
        if k[-1] == "weight":  # norms
            x = 1.0 + 0.2 * x
        elif k[-1] in ("bq_HK", "bk_GK", "bv_GK"):
            x = 0.2 * x
        else:  # as HF's initializer_range: logits of a few units, routing not tied
            x = 0.15 * x
        params[k] = x
    return build_model(cfg, traverse_util.unflatten_dict(params))


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """which -> (our model, its float32 HF export directory)."""
    root = tmp_path_factory.mktemp("hf_export")
    out = {}
    for which in ("target", "draft"):
        model, _ = load_model(bundled_model_dir(which))
        out[which] = model, export_hf(model, root / which)
    return out


@pytest.mark.parametrize("which,arch", [("target", "Qwen2MoeForCausalLM"),
                                        ("draft", "LlamaForCausalLM")])
def test_bundled_logits_match_transformers(bundled, which, arch):
    model, hf_dir = bundled[which]
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (B, T))
    ref, cls = hf_logits(hf_dir, tokens)
    assert cls == arch
    err = rel_err(our_logits(model, tokens), ref)
    print(f"{which}: max logits rel err {err:.2e}")
    assert err <= TOL, (which, err)


@pytest.mark.parametrize("which", ["target", "draft"])
def test_round_trip_import_gives_same_params(bundled, which):
    model, hf_dir = bundled[which]
    ours, back = flat_params(model), flat_params(load_hf_model(hf_dir))
    for k, v in ours.items():
        np.testing.assert_array_equal(back[k], v, err_msg=str(k))
    # Qwen2-MoE always has q/k/v biases: the export writes zeros, the import keeps them.
    extra = set(back) - set(ours)
    assert all(k[-1] in ("bq_HK", "bk_GK", "bv_GK") and not back[k].any() for k in extra)
    assert bool(extra) == (which == "target")


# model_type, our config: every mapping rule on a tiny random model
TINY = {
    "mixtral": moe_cfg(layers=1),
    # no shared expert, un-normalised top-k, a dense layer, head_dim != d / H
    "qwen2_moe": moe_cfg(head_dim=16, moe={"norm_topk_prob": False, "dense_layers": (1,)}),
    # per-head q/k norm, sparse step 2 (layer 0 dense), qkv bias (o_proj bias written as 0)
    "qwen3_moe": moe_cfg(qk_norm="head", qkv_bias=True, moe={"sparse_step": 2}),
    "olmoe": moe_cfg(layers=1, qk_norm="all", clip_qkv=0.5, tie_embeddings=True,
                     moe={"norm_topk_prob": False}),
    "qwen2": dense_cfg(qkv_bias=True),
    "qwen3": dense_cfg(qk_norm="head", head_dim=16, tie_embeddings=True, rope_theta=5e4),
}


# qwen2_moe without a shared expert writes it with width 0: torch warns on its init
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("model_type", list(TINY))
def test_tiny_models_match_transformers(tmp_path, model_type):
    cfg = TINY[model_type]
    assert choose_model_type(cfg) == model_type
    model = random_model(dataclasses.replace(cfg, eos_token_ids=(3, 5)))
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T))
    ref, _ = hf_logits(export_hf(model, tmp_path), toks)
    assert rel_err(our_logits(model, toks), ref) <= TOL
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == [3, 5]


def test_unsupported_features_are_named(tmp_path):
    cases = [
        (dense_cfg(qk_norm="all"), "qk_norm='all'"),
        (dense_cfg(clip_qkv=1.0), "clip_qkv=1.0"),
        (moe_cfg(moe={"shared_expert_dim": 32}), "shared_expert_gate=False"),
        # the closest fit (Qwen2-MoE, for the shared expert) lacks q/k norm
        (moe_cfg(qk_norm="head", moe={"shared_expert_dim": 32, "shared_expert_gate": True}),
         "closest is qwen2_moe, which lacks: qk_norm='head'"),
    ]
    for cfg, feature in cases:
        with pytest.raises(ValueError, match=re.escape(feature)):
            export_hf(random_model(cfg), tmp_path / "x")
    gated = moe_cfg(moe={"shared_expert_dim": 32, "shared_expert_gate": True})
    with pytest.raises(ValueError, match="cannot export as mixtral: moe.shared_expert_dim"):
        export_hf(random_model(gated), tmp_path / "x", model_type="mixtral")
    with pytest.raises(ValueError, match="dtype='int8'"):
        export_hf(random_model(dense_cfg()), tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()  # nothing written before the checks
    ours = tmp_path / "ckpt"  # a moesd_jax checkpoint would then read as a HF directory
    ours.mkdir()
    (ours / "moesd_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a moesd_jax checkpoint"):
        export_hf(random_model(dense_cfg()), ours)


def _script():
    spec = importlib.util.spec_from_file_location("convert_hf", REPO / "scripts" / "convert_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_cli_to_hf_bfloat16(tmp_path, capsys):
    """The bundled draft's params are bf16, so a bf16 export is lossless."""
    script, draft = _script(), bundled_model_dir("draft")
    out = tmp_path / "hf"
    assert script.main(["--to-hf", "--ckpt", str(draft), "--out", str(out),
                        "--dtype", "bfloat16"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    for f in tokenizer_dir(draft).iterdir():  # the bundled pair's shared tokenizer
        assert (out / f.name).read_bytes() == f.read_bytes()
    with safe_open(out / "model.safetensors", "np") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    model, _ = load_model(draft)
    back = load_hf_model(out, dtype="bfloat16")
    ours, theirs = flat_params(model), flat_params(back)
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(theirs[k], ours[k], err_msg=str(k))


def test_cli_bad_input(tmp_path, capsys):
    script = _script()
    missing = tmp_path / "missing"
    assert script.main(["--to-hf", "--ckpt", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and err.count("\n") == 1
    assert "Traceback" not in err
    assert script.main(["--to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err  # an existing directory that is no checkpoint
    assert err.startswith("error:") and "moesd_config.json" in err and err.count("\n") == 1
    for argv in (["--to-hf", "--out", "o"], ["--to-hf", "--ckpt", "c", "--hf-dir", "h",
                                              "--out", "o"], ["--ckpt", "c", "--out", "o"]):
        with pytest.raises(SystemExit) as e:
            script.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "error: " in err.splitlines()[-1] and "Traceback" not in err
