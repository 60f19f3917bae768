"""Data pipeline: Python-stdlib code corpus, train/held-out split, tokenizer and batching.

The bundled target/draft models are trained on text that every CPython installation has
offline: the ``*.py`` source files of the Python standard library
(``sysconfig.get_paths()["stdlib"]``).

Corpus definition (see :func:`list_corpus_files`):

* every ``*.py`` file below the stdlib directory, found recursively;
* excluding any file that has one of these directory names in its relative path:
  ``site-packages`` (third-party code), ``__pycache__``, ``test`` / ``tests`` / ``idle_test``
  (the regression-test suites and test data of the stdlib, ``idlelib`` and ``lib2to3``,
  which contain deliberately broken / Python-2 / oddly encoded files), and
  ``config-*`` directories (build-machine specific ``python-config.py``);
* excluding ``_sysconfigdata_*.py`` (generated at build time, contains machine paths);
* excluding files larger than 200 kB (generated tables such as ``pydoc_data/topics.py``);
* sorted by relative POSIX path, so the list is identical on every machine that has the
  same CPython version (the corpus itself differs between CPython versions).

The split (:func:`split_of`) is a pure function of the relative POSIX path, computed with
SHA-256, so it is stable across machines, processes and ``PYTHONHASHSEED`` values.

Tokenizer (:func:`train_tokenizer`): byte-level BPE (GPT-2 style ByteLevel pre-tokenizer
and decoder, ``add_prefix_space=False``), a single special token ``<|endoftext|>`` with
id 0, used as BOS, EOS and padding. Byte-level BPE is lossless, so
``decode(encode(s)) == s`` for any string.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "BUNDLED_TOKENIZER_DIR",
    "EOS_TOKEN",
    "EOS_ID",
    "MAX_FILE_BYTES",
    "EXCLUDED_DIR_NAMES",
    "stdlib_path",
    "list_corpus_files",
    "split_of",
    "corpus_files",
    "read_corpus",
    "train_tokenizer",
    "load_tokenizer",
    "encode_corpus",
    "batch_iterator",
    "eval_windows",
    "heldout_prompts",
]

Split = Literal["train", "heldout"]

#: Directory of the tokenizer shipped with the package.
BUNDLED_TOKENIZER_DIR: Path = Path(__file__).resolve().parent / "bundled" / "tokenizer"
#: The single special token: BOS, EOS and padding.
EOS_TOKEN: str = "<|endoftext|>"
#: Its id in every tokenizer trained by :func:`train_tokenizer`.
EOS_ID: int = 0
#: Files strictly larger than this many bytes are left out of the corpus.
MAX_FILE_BYTES: int = 200_000
#: A file is left out if any directory of its relative path has one of these names.
EXCLUDED_DIR_NAMES: frozenset[str] = frozenset(
    {"site-packages", "__pycache__", "test", "tests", "idle_test"}
)

_DEF_LINE = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+\w", re.MULTILINE)


def stdlib_path(stdlib_dir: str | Path | None = None) -> Path:
    """Resolve the standard-library source directory.

    Args:
        stdlib_dir: Explicit directory; ``None`` means ``sysconfig.get_paths()["stdlib"]``
            of the running interpreter.

    Returns:
        The directory as a :class:`~pathlib.Path`.
    """
    if stdlib_dir is None:
        stdlib_dir = sysconfig.get_paths()["stdlib"]
    return Path(stdlib_dir)


def _is_excluded(rel: Path) -> bool:
    """Whether a stdlib-relative path is outside the corpus (size is checked separately).

    Args:
        rel: Path relative to the stdlib directory.

    Returns:
        True if an excluded directory or generated file.
    """
    for part in rel.parts[:-1]:
        if part in EXCLUDED_DIR_NAMES or part.startswith("config-"):
            return True
    return rel.name.startswith("_sysconfigdata_")


def list_corpus_files(stdlib_dir: str | Path | None = None) -> list[Path]:
    """List the corpus files: stdlib ``*.py`` sources minus tests, caches and huge files.

    See the module docstring for the exact rules. The order is by relative POSIX path, so
    it is identical on every machine with the same CPython version.

    Args:
        stdlib_dir: Standard-library directory; defaults to the running interpreter's.

    Returns:
        Absolute paths of the corpus files, sorted by their path relative to ``stdlib_dir``.
    """
    root = stdlib_path(stdlib_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib directory not found: {root}")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune excluded directories (site-packages can be huge) instead of filtering later.
        dirnames[:] = [
            d for d in dirnames if d not in EXCLUDED_DIR_NAMES and not d.startswith("config-")
        ]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if _is_excluded(rel) or not path.is_file():
                continue
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            found.append((rel.as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def split_of(relpath: str, heldout_fraction: float = 0.05) -> Split:
    """Assign a corpus file to a split, deterministically from its relative path.

    The first 8 bytes of ``sha256(relpath)`` are read as a big-endian integer and mapped
    to ``[0, 1)``; values below ``heldout_fraction`` are held out. Python's ``hash()`` is
    not used, so the result is stable across processes and machines.

    Args:
        relpath: Path relative to the stdlib directory, POSIX separators
            (e.g. ``"json/decoder.py"``); backslashes are normalised to ``/``.
        heldout_fraction: Expected fraction of held-out files, in ``[0, 1]``.

    Returns:
        ``"train"`` or ``"heldout"``.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    key = relpath.replace("\\", "/").encode("utf-8")
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64
    return "heldout" if u < heldout_fraction else "train"


def corpus_files(
    split: Split, stdlib_dir: str | Path | None = None, heldout_fraction: float = 0.05
) -> list[Path]:
    """List the corpus files of one split, in corpus order.

    Args:
        split: ``"train"`` or ``"heldout"``.
        stdlib_dir: Standard-library directory; defaults to the running interpreter's.
        heldout_fraction: Passed to :func:`split_of`.

    Returns:
        Absolute paths of the files of that split.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = stdlib_path(stdlib_dir)
    return [
        p
        for p in list_corpus_files(root)
        if split_of(p.relative_to(root).as_posix(), heldout_fraction) == split
    ]


def read_corpus(
    split: Split, stdlib_dir: str | Path | None = None, heldout_fraction: float = 0.05
) -> list[str]:
    """Read the texts of one split.

    Files are decoded as UTF-8 with ``errors="replace"`` from their raw bytes (no newline
    translation), in corpus order.

    Args:
        split: ``"train"`` or ``"heldout"``.
        stdlib_dir: Standard-library directory; defaults to the running interpreter's.
        heldout_fraction: Passed to :func:`split_of`.

    Returns:
        One string per file.
    """
    return [
        p.read_bytes().decode("utf-8", errors="replace")
        for p in corpus_files(split, stdlib_dir, heldout_fraction)
    ]


def _wrap_tokenizer(tok: object) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` into a transformers fast tokenizer with our specials.

    Args:
        tok: A ``tokenizers.Tokenizer`` containing ``<|endoftext|>``.

    Returns:
        The wrapper, with ``<|endoftext|>`` as BOS/EOS/pad and no decode clean-up.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def train_tokenizer(
    texts: Sequence[str],
    vocab_size: int = 4096,
    out_dir: str | Path | None = None,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer.

    ByteLevel pre-tokenizer (GPT-2 regex, ``add_prefix_space=False``) and decoder, all 256
    byte symbols in the initial alphabet, special token ``<|endoftext|>`` at id 0 (BOS, EOS
    and pad). No normaliser and no post-processor, so encoding adds no special tokens and
    decoding is an exact inverse. Training is deterministic for a given input.

    Args:
        texts: Training documents.
        vocab_size: Total vocabulary size, special token and byte alphabet included.
        out_dir: If given, the tokenizer is saved there with ``save_pretrained``
            (``tokenizer.json`` + ``tokenizer_config.json``).
        min_frequency: Minimum pair count for a merge.

    Returns:
        The trained tokenizer as a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + EOS), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    if tok.token_to_id(EOS_TOKEN) != EOS_ID:
        raise RuntimeError("special token did not get id 0")
    fast = _wrap_tokenizer(tok)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out))
        _portable_config(out)
    return fast


def _portable_config(out: Path) -> None:
    """Name the generic fast-tokenizer class in ``tokenizer_config.json``.

    transformers 5 writes ``"TokenizersBackend"``, which transformers 4 cannot resolve;
    ``"PreTrainedTokenizerFast"`` loads with both.

    Args:
        out: Directory written by ``save_pretrained``.
    """
    cfg_path = out / "tokenizer_config.json"
    if not cfg_path.exists():
        return
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`train_tokenizer`.

    Args:
        path: A directory holding ``tokenizer.json`` or the ``tokenizer.json`` file itself;
            ``None`` means the bundled tokenizer (:data:`BUNDLED_TOKENIZER_DIR`).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``<|endoftext|>`` as BOS/EOS/pad.
    """
    from tokenizers import Tokenizer

    p = BUNDLED_TOKENIZER_DIR if path is None else Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {file}")
    return _wrap_tokenizer(Tokenizer.from_file(str(file)))


def encode_corpus(
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    chunk_size: int = 32,
    progress: bool = True,
) -> np.ndarray:
    """Encode documents into one token stream, each document followed by EOS.

    Args:
        tokenizer: Tokenizer from :func:`train_tokenizer` / :func:`load_tokenizer`.
        texts: Documents, in order.
        chunk_size: Documents per ``encode_batch`` call (the batch is encoded in parallel).
        progress: Show a tqdm progress bar.

    Returns:
        ``int32`` array of shape ``[total_tokens]``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token")
    backend = tokenizer.backend_tokenizer
    parts: list[np.ndarray] = []
    eos_arr = np.array([eos], dtype=np.int32)
    with tqdm(total=len(texts), desc="encode", unit="file", disable=not progress) as bar:
        for start in range(0, len(texts), chunk_size):
            chunk = list(texts[start : start + chunk_size])
            for enc in backend.encode_batch(chunk, add_special_tokens=False):
                parts.append(np.asarray(enc.ids, dtype=np.int32))
                parts.append(eos_arr)
            bar.update(len(chunk))
    if not parts:
        return np.zeros((0,), dtype=np.int32)
    return np.concatenate(parts).astype(np.int32, copy=False)


def batch_iterator(
    tokens: np.ndarray,
    batch: int,
    seq_len: int,
    seed: int,
    num_batches: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield random training windows from a token stream.

    Each row is a contiguous slice of ``seq_len + 1`` tokens (inputs ``row[:-1]``, targets
    ``row[1:]``) starting at a uniformly random offset. The sequence of batches is fully
    determined by ``seed`` (``numpy.random.default_rng``).

    Args:
        tokens: 1-D token stream, e.g. from :func:`encode_corpus`.
        batch: Rows per batch.
        seq_len: Input length; rows have ``seq_len + 1`` tokens.
        seed: Seed of the numpy Generator.
        num_batches: Number of batches to yield; ``None`` means infinitely many.

    Returns:
        An iterator of ``int32`` arrays of shape ``[batch, seq_len + 1]``.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    n_starts = tokens.shape[0] - seq_len  # valid starts: 0 .. len - (seq_len + 1)
    if n_starts < 1:
        raise ValueError(f"stream of {tokens.shape[0]} tokens too short for seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1)
    produced = 0
    while num_batches is None or produced < num_batches:
        starts = rng.integers(0, n_starts, size=batch)
        yield tokens[starts[:, None] + offsets[None, :]].astype(np.int32, copy=False)
        produced += 1


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Deterministic, non-overlapping evaluation windows (e.g. for held-out loss).

    Window ``i`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``: consecutive windows
    share only their boundary token, so their *targets* (``row[1:]``) do not overlap and
    every token after the first is predicted exactly once. If more windows exist than
    ``max_windows``, that many are taken evenly spaced across the whole stream (so every
    part of the held-out set is represented), in stream order.

    Args:
        tokens: 1-D token stream.
        seq_len: Input length; rows have ``seq_len + 1`` tokens.
        max_windows: Upper bound on the number of windows; ``None`` means all.

    Returns:
        ``int32`` array of shape ``[n_windows, seq_len + 1]``.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    n_avail = (tokens.shape[0] - 1) // seq_len
    if n_avail < 1:
        raise ValueError(f"stream of {tokens.shape[0]} tokens too short for seq_len={seq_len}")
    idx = np.arange(n_avail)
    if max_windows is not None and max_windows < n_avail:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        idx = np.unique(np.linspace(0, n_avail - 1, max_windows).round().astype(np.int64))
    starts = idx * seq_len
    return tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32, copy=False)


def heldout_prompts(
    tokenizer: PreTrainedTokenizerFast,
    n: int = 50,
    prompt_tokens: int = 64,
    seed: int = 0,
    stdlib_dir: str | Path | None = None,
    min_continuation_tokens: int | None = None,
    exclude_train_duplicates: bool = True,
) -> list[str]:
    """Deterministic code prompts from held-out files, for measuring speculative acceptance.

    Candidates are all lines of the held-out files that start a function definition
    (``def`` / ``async def``, at any indentation). They are visited in an order given by
    ``numpy.random.default_rng(seed)``; for each, the prompt is the text from the start of
    that line up to the end of its first ``prompt_tokens`` tokens. A candidate is kept only
    if (a) re-encoding the prompt gives exactly those ``prompt_tokens`` ids, so the prompt's
    tokenization is a prefix of the source's and generation continues naturally, and (b) at
    least ``min_continuation_tokens`` tokens of the file follow the prompt, (c) it is not a
    duplicate of an earlier prompt and (d) with ``exclude_train_duplicates``, the prompt
    (leading indentation stripped) does not occur verbatim at a ``def`` in a train file:
    the stdlib repeats boilerplate (e.g. the ``encodings`` codecs), and such prompts would
    measure memorisation rather than generalisation. Prompts are returned in visiting order.

    Args:
        tokenizer: Tokenizer from :func:`train_tokenizer` / :func:`load_tokenizer`.
        n: Number of prompts.
        prompt_tokens: Exact token length of every prompt.
        seed: Seed of the candidate order.
        stdlib_dir: Standard-library directory; defaults to the running interpreter's.
        min_continuation_tokens: Tokens that must follow the prompt in the source file;
            defaults to ``prompt_tokens``.
        exclude_train_duplicates: Drop prompts that also appear in the train split.

    Returns:
        ``n`` prompt strings, each encoding to exactly ``prompt_tokens`` tokens.
    """
    if min_continuation_tokens is None:
        min_continuation_tokens = prompt_tokens
    texts = read_corpus("heldout", stdlib_dir)
    candidates = [
        (doc, m.start()) for doc, text in enumerate(texts) for m in _DEF_LINE.finditer(text)
    ]
    backend = tokenizer.backend_tokenizer
    need = prompt_tokens + min_continuation_tokens
    # Characters needed for `need` tokens are unbounded in principle; start with a generous
    # window and grow it if a candidate's window turns out too short.
    order = np.random.default_rng(seed).permutation(len(candidates))
    train_index = _def_index(read_corpus("train", stdlib_dir)) if exclude_train_duplicates else None
    prompts: list[str] = []
    seen: set[str] = set()
    for ci in order:
        if len(prompts) == n:
            break
        doc, start = candidates[int(ci)]
        text = texts[doc]
        width = 16 * need
        while True:
            window = text[start : start + width]
            enc = backend.encode(window, add_special_tokens=False)
            if len(enc.ids) > need or start + width >= len(text):
                break
            width *= 2
        if len(enc.ids) <= need:  # file ends too soon after this def
            continue
        end_char = enc.offsets[prompt_tokens - 1][1]
        prompt = window[:end_char]
        if backend.encode(prompt, add_special_tokens=False).ids != enc.ids[:prompt_tokens]:
            continue
        if prompt in seen or (train_index is not None and _in_def_index(train_index, prompt)):
            continue
        seen.add(prompt)
        prompts.append(prompt)
    if len(prompts) < n:
        raise ValueError(
            f"only {len(prompts)} usable prompts of {prompt_tokens} tokens in held-out files,"
            f" {n} requested"
        )
    return prompts


_DEF_KEY_CHARS = 48


def _def_index(texts: Sequence[str]) -> tuple[Sequence[str], dict[str, list[tuple[int, int]]]]:
    """Index the ``def`` keywords of ``texts`` by the text that follows them.

    Args:
        texts: Documents.

    Returns:
        ``(texts, index)`` where ``index`` maps the first characters after a def line's
        indentation to ``(document, char position)`` pairs.
    """
    index: dict[str, list[tuple[int, int]]] = {}
    for doc, text in enumerate(texts):
        for m in _DEF_LINE.finditer(text):
            line = text[m.start() : m.end()]
            pos = m.start() + len(line) - len(line.lstrip(" \t"))
            index.setdefault(text[pos : pos + _DEF_KEY_CHARS], []).append((doc, pos))
    return texts, index


def _in_def_index(
    indexed: tuple[Sequence[str], dict[str, list[tuple[int, int]]]], snippet: str
) -> bool:
    """Whether ``snippet`` (indentation stripped) occurs at an indexed ``def``.

    Args:
        indexed: Result of :func:`_def_index`.
        snippet: Text starting with an optionally indented ``def`` line.

    Returns:
        True if some indexed document contains it verbatim at a ``def`` keyword.
    """
    texts, index = indexed
    body = snippet.lstrip(" \t")
    return any(
        texts[doc].startswith(body, pos) for doc, pos in index.get(body[:_DEF_KEY_CHARS], [])
    )
