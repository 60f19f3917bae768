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
    with pytest.raises(ConfigError, match="only the bundled target has a bundled head"):
        load_models(str(ckpt), spec="eagle")


def test_eagle_head_loads_cast_to_float32(ckpt, tmp_path):
    """A bfloat16-stored head (as bundled) is cast to float32 at load on CPU."""
    from flax import nnx

    from moesd_jax.checkpoint import save_checkpoint
    from moesd_jax.spec.eagle import EagleConfig, EagleHead
    from moesd_jax.spec.eagle_io import cast_eagle, save_eagle

    target = build(moe_cfg(experts=8, param_dtype="bfloat16"), seed=0)
    save_checkpoint(tmp_path / "t", target)
    head = cast_eagle(EagleHead(EagleConfig.for_target(target.cfg), nnx.Rngs(0)), "bfloat16")
    save_eagle(tmp_path / "h", head)
    lm = load_models(str(tmp_path / "t"), str(tmp_path / "h"), spec="eagle")
    assert lm.draft.cfg.param_dtype == "float32"
    assert str(lm.draft.fc_KD[...].dtype) == "float32"
    # bench.py spec --eagle loads heads through the same rule: the target's dtype, and a
    # bfloat16-resident target (accelerators) keeps a bfloat16 head as it is
    from moesd_jax.runtime import head_as_target

    assert str(head_as_target(head, lm.target).fc_KD[...].dtype) == "float32"
    assert head_as_target(head, target) is head
