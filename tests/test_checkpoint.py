"""Orbax checkpoints: bit-identical round trip, sharded restore, HF directories, clear
errors for missing / incomplete / corrupted checkpoints, and the convert_hf.py CLI."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from moesd_jax import checkpoint as ckpt
from moesd_jax.checkpoint import CheckpointError, load_model, save_checkpoint
from moesd_jax.models import hf as hf_lib
from tests.models.test_hf_parity import make_hf_model

REPO = Path(__file__).resolve().parents[1]
BUNDLED_TOKENIZER = REPO / "moesd_jax" / "bundled" / "tokenizer"


def flat(model) -> dict:
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))


def assert_same_params(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype, k
        assert np.array_equal(x, y), k


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Tiny Qwen2-MoE (shared expert, qkv bias, a dense layer) with the bundled tokenizer."""
    d = tmp_path_factory.mktemp("hf") / "qwen2_moe"
    make_hf_model("qwen2_moe", d)
    for f in ckpt.tokenizer_files(BUNDLED_TOKENIZER):
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def model(hf_dir):
    return hf_lib.load_hf_model(hf_dir)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(path, model, tokenizer_dir=BUNDLED_TOKENIZER)
    return path


@pytest.fixture
def fresh_copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def test_round_trip_bit_identical(model, saved):
    loaded, tok = load_model(saved)
    assert loaded.cfg == model.cfg
    assert_same_params(loaded, model)
    assert tok is not None
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))
    text = "def f(x):\n    return x + 1\n"
    assert tok.encode(text) == ref.encode(text)


def test_dispatch_override(saved):
    loaded, _ = load_model(saved, dispatch="dense")
    assert loaded.cfg.moe.dispatch == "dense"


def _expert_shardings(state, mesh):
    """Experts split over the 8 devices, everything else replicated."""
    def pick(x):
        spec = PartitionSpec("x") if x.ndim == 3 and x.shape[0] == 8 else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(pick, nnx.to_pure_dict(state))


def test_restore_into_shardings(model, saved, hf_dir):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    want = _expert_shardings(nnx.state(model), mesh)
    for src in (saved, hf_dir):
        loaded, _ = load_model(src, shardings=want)
        assert_same_params(loaded, model)
        got = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(loaded)))
        for k, s in traverse_util.flatten_dict(want).items():
            assert got[k].sharding.is_equivalent_to(s, got[k].ndim), (src, k)
        w = got[("layers", 0, "moe", "w_gate_EDF")]
        assert w.addressable_shards[0].data.shape[0] == 1  # one expert per device


def test_hf_dir_loads_directly(model, hf_dir):
    loaded, tok = load_model(hf_dir)
    assert loaded.cfg == model.cfg
    assert_same_params(loaded, model)
    assert tok is not None


def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_dir_without_config(tmp_path, fresh_copy):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=ckpt.CONFIG_NAME) as e:
        load_model(empty)
    assert str(empty) in str(e.value)
    (fresh_copy / ckpt.CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable config"):
        load_model(fresh_copy)
    (fresh_copy / ckpt.CONFIG_NAME).unlink()  # what an interrupted save leaves
    with pytest.raises(CheckpointError, match="save did not finish"):
        load_model(fresh_copy)


def test_missing_params_dir(fresh_copy):
    shutil.rmtree(fresh_copy / ckpt.PARAMS_DIR)
    with pytest.raises(CheckpointError, match="params/ is missing"):
        load_model(fresh_copy)


# When one array read fails, orbax leaves its sibling read coroutines un-awaited; Python
# reports them when they are collected. Harmless, and not ours to fix.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_corrupted_files(fresh_copy):
    data_dir = fresh_copy / ckpt.PARAMS_DIR / "ocdbt.process_0" / "d"
    biggest = max(data_dir.iterdir(), key=lambda f: f.stat().st_size)
    raw = biggest.read_bytes()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "overwritten": np.random.default_rng(0).bytes(len(raw)),
        "one byte flipped": raw[: len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0xFF])
        + raw[len(raw) // 2 + 1:],
    }
    for what, data in cases.items():
        biggest.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_model(fresh_copy)
        msg = str(e.value)
        assert str(fresh_copy / ckpt.PARAMS_DIR) in msg, (what, msg)
        assert "truncated" in msg or "corrupted" in msg, (what, msg)
    biggest.write_bytes(raw)
    load_model(fresh_copy)  # restored file: loads again
    gc.collect()  # report the orphaned coroutines here, under the filters above


def test_unsupported_model_type(tmp_path, hf_dir):
    d = tmp_path / "gpt"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_bigcode"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gpt_bigcode"):
        load_model(d)
    with pytest.raises(ValueError, match="unsupported model_type='gpt_bigcode'"):
        hf_lib.load_hf_model(d)


def test_missing_tensors_are_listed(tmp_path, hf_dir):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "broken"
    shutil.copytree(hf_dir, d)
    tensors = load_file(d / "model.safetensors")
    gone = ["model.layers.0.mlp.experts.3.up_proj.weight", "model.layers.1.self_attn.q_proj.bias"]
    save_file({k: v for k, v in tensors.items() if k not in gone}, d / "model.safetensors")
    with pytest.raises(ValueError) as e:
        hf_lib.load_hf_model(d)
    assert all(name in str(e.value) for name in gone), str(e.value)
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj"):
        load_model(d)


def test_bundled_model_dir():
    assert ckpt.bundled_model_dir() == REPO / "moesd_jax" / "bundled" / "target"
    assert ckpt.bundled_model_dir("draft").name == "draft"
    with pytest.raises(ValueError, match="which"):
        ckpt.bundled_model_dir("other")


def _run_convert(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "convert_hf.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_convert_script(hf_dir, model, tmp_path):
    out = tmp_path / "converted"
    r = _run_convert("--hf-dir", str(hf_dir), "--out", str(out), "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert "parameters:" in r.stdout and str(out) in r.stdout
    loaded, tok = load_model(out)
    assert tok is not None and loaded.cfg.param_dtype == "bfloat16"
    fa, fb = flat(loaded), flat(model)
    for k in fb:
        assert fa[k].dtype == np.dtype("bfloat16")
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]).astype(fa[k].dtype))



def test_convert_script_errors(tmp_path, hf_dir, capsys):
    """Bad input: one ``error:`` line on stderr, exit code 2 (in-process: no jax start-up)."""
    spec = importlib.util.spec_from_file_location("convert_hf", REPO / "scripts" / "convert_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--hf-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and "Traceback" not in err
    d = tmp_path / "gpt"
    shutil.copytree(hf_dir, d)
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert script.main(["--hf-dir", str(d), "--out", str(tmp_path / "y")]) == 2
    assert "gpt2" in capsys.readouterr().err
