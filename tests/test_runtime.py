"""Model resolution for the CLIs: errors, and restoring straight into a sharding."""

import pytest

from moesd_jax.checkpoint import save_checkpoint
from moesd_jax.config import ConfigError
from moesd_jax.runtime import load_models
from tests.helpers import build, moe_cfg


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "target"
    save_checkpoint(path, build(moe_cfg(experts=8), seed=0))
    return path


def test_load_models_restores_into_mesh_sharding(ckpt):
    lm = load_models(str(ckpt), spec="none", mesh="ep")
    w = lm.target.layers[0].moe.w_gate_EDF[...]
    assert w.sharding.spec[0] == "expert"
    assert len(w.sharding.device_set) == 8
    assert w.addressable_shards[0].data.shape[0] == 1  # one of 8 experts per device


def test_load_models_errors(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_models(str(tmp_path / "missing"), spec="none")
    with pytest.raises(ConfigError, match="--spec='beam'"):
        load_models(str(ckpt), spec="beam")
    with pytest.raises(ConfigError, match="--draft given"):
        load_models(str(ckpt), draft=str(ckpt), spec="ngram")
