"""Tests for the data pipeline (corpus, split, tokenizer, batching, held-out prompts)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moesd_jax import data
from moesd_jax.data import (
    BUNDLED_TOKENIZER_DIR,
    EOS_ID,
    EOS_TOKEN,
    batch_iterator,
    corpus_files,
    encode_corpus,
    eval_windows,
    heldout_prompts,
    list_corpus_files,
    load_tokenizer,
    read_corpus,
    split_of,
    stdlib_path,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]

TRICKY = (
    "def f(x):\n\tif x:\t# tab\n\t\treturn 'héllo wörld 漢字 🙂'\r\n"
    "    \n\n\n        x  =  1   \t \n\u00a0\u200b  é\u0301 Ω≈ç√∫\n"
    "class  A ( object ) :\n    pass\n\f\v  <|endoftext|>trailing   "
)


@pytest.fixture(scope="module")
def tok():
    """The bundled tokenizer."""
    return load_tokenizer()


@pytest.fixture(scope="module")
def heldout_texts() -> list[str]:
    """Texts of the held-out split."""
    return read_corpus("heldout")


# ---------------------------------------------------------------- corpus & split


def test_corpus_listing_rules():
    root = stdlib_path()
    files = list_corpus_files()
    rels = [p.relative_to(root).as_posix() for p in files]
    assert len(files) > 300
    assert rels == sorted(rels)
    assert len(set(rels)) == len(rels)
    assert "os.py" in rels and "json/decoder.py" in rels
    for p, rel in zip(files, rels, strict=True):
        parts = rel.split("/")
        assert rel.endswith(".py")
        assert not set(parts[:-1]) & {"site-packages", "test", "tests", "idle_test", "__pycache__"}
        assert not parts[-1].startswith("_sysconfigdata_")
        assert p.stat().st_size <= data.MAX_FILE_BYTES
    assert list_corpus_files(root) == files


def test_split_is_sha256_based_and_pinned():
    # Independent re-implementation of the rule.
    for rel in ["os.py", "json/decoder.py", "chunk.py", "token.py", "a/b/c.py"]:
        u = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2.0**64
        assert split_of(rel) == ("heldout" if u < 0.05 else "train")
    # Pinned values: changing the rule would silently change what the bundled models saw.
    assert split_of("os.py") == "train"
    assert split_of("json/decoder.py") == "train"
    assert split_of("chunk.py") == "heldout"
    assert split_of("traceback.py") == "heldout"
    assert split_of("importlib/_bootstrap_external.py") == "heldout"
    assert split_of("importlib\\_bootstrap_external.py") == "heldout"
    assert split_of("chunk.py", heldout_fraction=0.0) == "train"
    assert split_of("os.py", heldout_fraction=1.0) == "heldout"
    with pytest.raises(ValueError):
        split_of("os.py", heldout_fraction=1.5)


def test_split_independent_of_hash_seed():
    code = (
        "from moesd_jax.data import list_corpus_files, split_of, stdlib_path\n"
        "r = stdlib_path()\n"
        "print(sum(split_of(p.relative_to(r).as_posix()) == 'heldout' "
        "for p in list_corpus_files()))\n"
    )
    counts = set()
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        counts.add(out.stdout.strip())
    assert len(counts) == 1


def test_splits_nonempty_disjoint_and_cover_corpus():
    train = corpus_files("train")
    held = corpus_files("heldout")
    assert train and held
    assert not set(train) & set(held)
    assert sorted(set(train) | set(held)) == sorted(list_corpus_files())
    frac = len(held) / (len(train) + len(held))
    assert 0.02 < frac < 0.10
    assert corpus_files("heldout") == held  # deterministic
    with pytest.raises(ValueError):
        corpus_files("validation")  # type: ignore[arg-type]


def test_read_corpus_matches_files(heldout_texts):
    held = corpus_files("heldout")
    assert len(heldout_texts) == len(held)
    assert heldout_texts[0] == held[0].read_bytes().decode("utf-8", errors="replace")
    assert all(isinstance(t, str) for t in heldout_texts)
    assert sum(len(t) for t in heldout_texts) > 100_000


# ---------------------------------------------------------------- tokenizer


def test_bundled_tokenizer_loads_with_autotokenizer():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    files = sorted(p.name for p in BUNDLED_TOKENIZER_DIR.iterdir())
    assert "tokenizer.json" in files
    cfg = json.loads((BUNDLED_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    # transformers 4 would otherwise strip spaces before punctuation when decoding.
    assert cfg["clean_up_tokenization_spaces"] is False
    assert cfg["eos_token"] == cfg["bos_token"] == cfg["pad_token"] == EOS_TOKEN
    assert sum(p.stat().st_size for p in BUNDLED_TOKENIZER_DIR.iterdir()) < 1_000_000
    auto = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER_DIR))
    assert len(auto) == 4096
    assert auto.vocab_size == 4096
    assert auto.eos_token == EOS_TOKEN and auto.eos_token_id == EOS_ID == 0
    assert auto.bos_token_id == 0 and auto.pad_token_id == 0
    raw = PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER_DIR / "tokenizer.json"))
    assert len(raw) == 4096 and raw.convert_tokens_to_ids(EOS_TOKEN) == 0
    ids = auto.encode("def f(x):\n\treturn x\n")
    assert EOS_ID not in ids  # no automatic special tokens
    assert raw.encode("def f(x):\n\treturn x\n") == ids


def test_load_tokenizer(tok):
    assert len(tok) == 4096 and tok.eos_token_id == 0 and tok.pad_token_id == 0
    same = load_tokenizer(BUNDLED_TOKENIZER_DIR / "tokenizer.json")
    assert same.encode(TRICKY) == tok.encode(TRICKY)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(ROOT / "does-not-exist")


def test_round_trip_heldout_and_tricky(tok, heldout_texts):
    samples = [*heldout_texts, TRICKY, "", "\t", "\n\n", "🙂", " leading space"]
    assert any("\t" in t for t in samples) and any(ord(c) > 127 for c in samples[0] + TRICKY)
    backend = tok.backend_tokenizer
    for enc, text in zip(backend.encode_batch(samples), samples, strict=True):
        assert tok.decode(enc.ids) == text
    assert tok.decode(tok.encode(TRICKY)) == TRICKY


def test_heldout_compression(tok, heldout_texts):
    ids = encode_corpus(tok, heldout_texts, progress=False)
    n_bytes = sum(len(t.encode("utf-8")) for t in heldout_texts)
    bpt = n_bytes / (ids.size - len(heldout_texts))
    assert 2.8 < bpt < 6.0, bpt


def test_train_tokenizer_deterministic_and_saved(tmp_path, heldout_texts):
    from transformers import AutoTokenizer

    texts = heldout_texts[:6] + [TRICKY]
    a = train_tokenizer(texts, vocab_size=512, out_dir=tmp_path / "a")
    b = train_tokenizer(texts, vocab_size=512, out_dir=tmp_path / "b")
    ja = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert ja == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert len(a) == len(b) == 512
    vocab = json.loads(ja)["model"]["vocab"]
    assert vocab[EOS_TOKEN] == 0 and len(vocab) == 512
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert loaded.eos_token_id == 0 and len(loaded) == 512
    assert loaded.decode(loaded.encode(TRICKY)) == TRICKY
    # Unseen characters still round-trip (byte fallback via the 256-byte alphabet).
    unseen = "ƒ(ж) → ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\t\u2028"
    assert loaded.decode(loaded.encode(unseen)) == unseen
    with pytest.raises(ValueError):
        train_tokenizer(texts, vocab_size=100)


# ---------------------------------------------------------------- encoding & batching


def test_encode_corpus_appends_eos(tok):
    texts = ["def f():\n    pass\n", "x = 1", ""]
    ids = encode_corpus(tok, texts, progress=False, chunk_size=2)
    assert ids.dtype == np.int32 and ids.ndim == 1
    expected: list[int] = []
    for t in texts:
        expected += tok.encode(t) + [EOS_ID]
    assert ids.tolist() == expected
    assert int((ids == EOS_ID).sum()) == len(texts)
    assert encode_corpus(tok, [], progress=False).shape == (0,)


def test_batch_iterator_shapes_and_reproducibility():
    tokens = np.arange(1000, dtype=np.int32)
    it = batch_iterator(tokens, batch=4, seq_len=16, seed=7)
    first = [next(it) for _ in range(3)]
    again = list(batch_iterator(tokens, batch=4, seq_len=16, seed=7, num_batches=3))
    other = list(batch_iterator(tokens, batch=4, seq_len=16, seed=8, num_batches=3))
    assert len(again) == 3
    for x, y in zip(first, again, strict=True):
        assert x.shape == (4, 17) and x.dtype == np.int32
        np.testing.assert_array_equal(x, y)
        # Rows are contiguous windows of the stream, all inside it.
        np.testing.assert_array_equal(np.diff(x, axis=1), 1)
        assert x.min() >= 0 and x.max() <= 999
    assert not all(np.array_equal(x, y) for x, y in zip(first, other, strict=True))
    # All starts, including the last valid one, are reachable; nothing out of range.
    tiny = np.arange(6, dtype=np.int32)
    rows = np.concatenate(list(batch_iterator(tiny, batch=64, seq_len=4, seed=0, num_batches=4)))
    assert set(rows[:, 0].tolist()) == {0, 1}
    with pytest.raises(ValueError):
        next(batch_iterator(tiny, batch=1, seq_len=6, seed=0))


def test_eval_windows_deterministic_non_overlapping():
    tokens = np.arange(101, dtype=np.int32)
    w = eval_windows(tokens, seq_len=10)
    assert w.shape == (10, 11) and w.dtype == np.int32
    targets = w[:, 1:].ravel()
    assert len(set(targets.tolist())) == targets.size  # every target predicted once
    np.testing.assert_array_equal(targets, np.arange(1, 101))
    np.testing.assert_array_equal(w, eval_windows(tokens, seq_len=10))
    sub = eval_windows(tokens, seq_len=10, max_windows=3)
    assert sub.shape == (3, 11)
    assert sub[0, 0] == 0 and sub[-1, 0] == 90  # spread over the whole stream
    assert eval_windows(tokens, seq_len=10, max_windows=50).shape == (10, 11)


# ---------------------------------------------------------------- held-out prompts


def test_heldout_prompts(tok, heldout_texts):
    prompts = heldout_prompts(tok, n=50, prompt_tokens=64, seed=0)
    assert len(prompts) == 50
    assert len(set(prompts)) == 50
    assert heldout_prompts(tok, n=50, prompt_tokens=64, seed=0) == prompts
    assert heldout_prompts(tok, n=50, prompt_tokens=64, seed=1) != prompts
    train_blob = "\x00".join(read_corpus("train"))
    for p in prompts:
        assert p.lstrip(" \t").startswith(("def ", "async def "))
        assert len(tok.encode(p)) == 64
        assert any(p in t for t in heldout_texts)
        assert p.lstrip(" \t") not in train_blob  # no verbatim train duplicates
    short = heldout_prompts(tok, n=5, prompt_tokens=16, seed=0)
    assert len(short) == 5 and all(len(tok.encode(p)) == 16 for p in short)
    with pytest.raises(ValueError):
        heldout_prompts(tok, n=100_000, prompt_tokens=16)
