"""EAGLE-3 head: lossless SD (chain and tree), training, checkpoint layouts, bad inputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moesd_jax.checkpoint import CheckpointError
from moesd_jax.config import ConfigError, SpecConfig
from moesd_jax.spec.decoder import SpecDecoder
from moesd_jax.spec.eagle import EagleConfig, EagleHead, default_hidden_layers
from moesd_jax.spec.eagle_io import load_eagle, save_eagle, save_eagle_hf
from moesd_jax.train_eagle import EagleTrainConfig, init_eagle_training, ttt_forward
from tests.helpers import build, moe_cfg

RNG = np.random.default_rng(0)
PROMPTS = [list(RNG.integers(0, 64, size=n)) for n in (5, 17, 9)]
PROMPTS[1] = [3, 4, 5, 6] * 4 + [3]


@pytest.fixture(scope="module")
def target():
    # dense dispatch: the same tokens as gather, and the decode loop compiles faster
    return build(moe_cfg(moe={"dispatch": "dense"}), seed=0)


@pytest.fixture(scope="module")
def trained(target):
    """A head trained for a few steps on the tiny target: (head, losses)."""
    cfg = EagleConfig.for_target(target.cfg)
    tc = EagleTrainConfig(steps=25, batch=4, seq_len=24, lr=1e-2, warmup=2, ttt_steps=2,
                          target_dispatch=None)
    graphdef, params, rest, opt, tstate, step, _ = init_eagle_training(cfg, tc, target)
    rng = np.random.default_rng(1)
    # repetitive windows: a pattern the target continues and the head can learn
    base = rng.integers(0, 64, size=(tc.steps, tc.batch, 8))
    losses = []
    for i in range(tc.steps):
        batch = jnp.asarray(np.tile(base[i], (1, 5))[:, : tc.seq_len + 1], jnp.int32)
        params, opt, m = step(params, opt, rest, batch, tstate)
        losses.append(float(m["loss"]))
    return nnx.merge(graphdef, params, rest), losses


@pytest.fixture(scope="module")
def ar_tokens(target):
    return [r.token_ids for r in SpecDecoder(target).generate(PROMPTS, 20)]


def test_training_loss_falls(trained):
    _, losses = trained
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("spec", [SpecConfig(method="eagle", k=3),
                                  SpecConfig(method="eagle", tree="tree-7")],
                         ids=["chain-3", "tree-7"])
def test_greedy_sd_equals_ar(target, trained, ar_tokens, spec):
    head, _ = trained
    res = SpecDecoder(target, head, spec).generate(PROMPTS, 20)
    for i, r in enumerate(res):
        assert r.token_ids == ar_tokens[i], (spec, i)
        assert sum(r.stats["accepted_per_position"]) == r.stats["accepted"]
    assert sum(r.stats["accepted"] for r in res) > 0  # the trained head drafts something


def test_training_unroll_matches_drafting(target):
    """Training-time-test step k at index i == a depth-k node drafted at root i."""
    head = EagleHead(EagleConfig.for_target(target.cfg, draft_vocab=40), nnx.Rngs(1))
    hc = head.cfg
    x = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 13)), jnp.int32)

    @jax.jit
    def diffs(x):
        inp = x[:, :-1]
        b, t = inp.shape
        pos = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        _, _, _, feats = target(inp, pos, target.init_cache(b, t),
                                hidden_layers=hc.hidden_layers)
        embed = target.embed.embedding_VD[...]
        outs = ttt_forward(head, embed, x, feats, 3)
        z = jnp.zeros((b, 32, hc.num_kv_heads, hc.head_dim))
        lg0, pre0, k, v = head(x[:, 1:], head.project(feats), pos, z, z,
                               jnp.zeros((b,), jnp.int32), embed)
        i = 5  # root at position 5: nodes of depth 1 and 2 at slots 6, 7
        start = jnp.full((b,), i + 1, jnp.int32)
        one = jnp.ones((1,), jnp.int32)
        lg1, pre1, k, v = head(x[:, i + 2:i + 3], pre0[:, i:i + 1], (i + 1) * jnp.ones((b, 1)),
                               k, v, start, embed, tree_mask=jnp.ones((1, 1), bool),
                               write_offsets_T=0 * one)
        lg2, _, _, _ = head(x[:, i + 3:i + 4], pre1, (i + 2) * jnp.ones((b, 1)), k, v, start,
                            embed, tree_mask=jnp.ones((1, 2), bool), write_offsets_T=one)
        return (jnp.max(jnp.abs(lg0 - outs[0])), jnp.max(jnp.abs(lg1[:, 0] - outs[1][:, i])),
                jnp.max(jnp.abs(lg2[:, 0] - outs[2][:, i])))

    np.testing.assert_allclose(np.asarray(diffs(x)), 0.0, atol=1e-4)


@jax.jit
def _forward(graphdef, state, embed_VD, tok, hidden):
    head = nnx.merge(graphdef, state)
    pos = jnp.broadcast_to(jnp.arange(6)[None], (2, 6))
    z = jnp.zeros((2, 8, head.cfg.num_kv_heads, head.cfg.head_dim))
    lg, pre, _, _ = head(tok, head.project(hidden), pos, z, z, jnp.zeros((2,), jnp.int32),
                         embed_VD)
    return head.target_logits(lg), pre


def _logits(head, target):
    """Draft logits over the target vocabulary and features of a fresh forward."""
    rng = np.random.default_rng(3)
    tok = jnp.asarray(rng.integers(0, 64, (2, 6)), jnp.int32)
    hidden = jnp.asarray(rng.normal(size=(2, 6, 3 * head.cfg.d_model)), jnp.float32)
    out = _forward(*nnx.split(head), target.embed.embedding_VD[...], tok, hidden)
    return tuple(np.asarray(x) for x in out)


@pytest.mark.parametrize("draft_vocab", [None, 20])
def test_public_and_native_layouts_round_trip(target, tmp_path, draft_vocab):
    cfg = EagleConfig.for_target(target.cfg, draft_vocab=draft_vocab, hidden_layers=(0, 1, 1))
    head = EagleHead(cfg, nnx.Rngs(4))
    if draft_vocab:  # a non-trivial map: every other target id
        head.d2t[...] = jnp.arange(draft_vocab, dtype=jnp.int32)
        head.t2d[...] = (jnp.arange(64) % 2 == 0) & (jnp.arange(64) < 2 * draft_vocab)
    want = _logits(head, target)
    hf = save_eagle_hf(tmp_path / "hf", head)
    raw = json.loads((hf / "config.json").read_text())
    assert raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 2]
    for loaded in (load_eagle(hf, target.cfg), load_eagle(save_eagle(tmp_path / "nat", head))):
        assert loaded.cfg.hidden_layers == (0, 1, 1) and loaded.cfg.vd == cfg.vd
        got = _logits(loaded, target)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    if draft_vocab:  # odd target ids are outside the draft vocabulary
        assert np.all(want[0][..., 1::2] < -1e29)


def test_public_layout_errors_name_the_problem(target, tmp_path):
    head = EagleHead(EagleConfig.for_target(target.cfg), nnx.Rngs(0))
    hf = save_eagle_hf(tmp_path / "hf", head)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(hf / "model.safetensors"))
    del tensors["midlayer.hidden_norm.weight"]
    save_file(tensors, str(hf / "model.safetensors"))
    with pytest.raises(CheckpointError, match="midlayer.hidden_norm.weight"):
        load_eagle(hf, target.cfg)
    raw = json.loads((hf / "config.json").read_text())
    del raw["hidden_size"]
    (hf / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_eagle(hf, target.cfg)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_eagle(tmp_path / "nowhere")


def test_bad_inputs_raise(target):
    head = EagleHead(EagleConfig.for_target(target.cfg), nnx.Rngs(0))
    with pytest.raises(ValueError, match="width 64.*3 \\* d_model = 96"):
        head.project(jnp.zeros((1, 2, 64)))
    with pytest.raises(ValueError, match="layer 5 is outside"):
        SpecDecoder(target, EagleHead(EagleConfig.for_target(target.cfg, hidden_layers=(0, 1, 5)),
                                      nnx.Rngs(0)), SpecConfig(method="eagle", k=2))
    with pytest.raises(ValueError, match="needs an EagleHead"):
        SpecDecoder(target, None, SpecConfig(method="eagle", k=2))
    with pytest.raises(ConfigError, match="draft_vocab=99"):
        EagleConfig.for_target(target.cfg, draft_vocab=99)
    with pytest.raises(ConfigError, match="hidden_layers"):
        EagleConfig.for_target(target.cfg, hidden_layers=(0, 1))
    assert default_hidden_layers(32) == (1, 16, 30)
    assert default_hidden_layers(2) == (0, 0, 1)


def test_bfloat16_bundle_round_trip(target, tmp_path):
    """The bundled head's storage: bfloat16 params saved natively, cast back to float32
    at load; logits equal the float32 head whose weights are rounded to bfloat16."""
    from moesd_jax.spec.eagle_io import cast_eagle

    head = EagleHead(EagleConfig.for_target(target.cfg, draft_vocab=20), nnx.Rngs(5))
    small = cast_eagle(head, "bfloat16")
    assert small.cfg.param_dtype == "bfloat16"
    leaves = jax.tree.leaves(nnx.state(small))
    assert {str(x.dtype) for x in leaves} == {"bfloat16", "int32", "bool"}
    back = cast_eagle(load_eagle(save_eagle(tmp_path / "b", small), target.cfg), "float32")
    rounded = cast_eagle(cast_eagle(head, "bfloat16"), "float32")
    assert back.cfg.param_dtype == "float32"
    got, want = _logits(back, target), _logits(rounded, target)
    np.testing.assert_array_equal(got[0], want[0])
    assert not np.array_equal(_logits(head, target)[0], got[0])  # the rounding is real
