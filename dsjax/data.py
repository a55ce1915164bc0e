"""Training data: corpora (flat token arrays plus a tokenizer) and a deterministic, resumable sample order.

A corpus is two 1-D token arrays (train, val) and encode/decode. `DataConfig.source` picks one of:

- "default": the Python standard library's own .py files, byte tokens (vocab 256). Every Python install
  has them, so the tiny preset trains with no download.
- "text": a UTF-8 file or directory, byte tokens or a Hugging Face tokenizer.json.
- "tokens": nanoGPT's flat little-endian uint16 .bin files, memory-mapped (never loaded whole).
- "synthetic": no corpus; `SyntheticSamples` makes random tokens (benchmarks, no I/O).

Samples are addressed by a global index i = step * batch_size + row, so a batch is a pure function of
(config, step): the same for any number of processes and whichever rows a process loads, and a resumed
run continues exactly (the training position is just the step). `global_batch` loads only the rows this
process's devices hold.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import pathlib
import sysconfig
from collections.abc import Callable, Sequence

import grain
import jax
import numpy as np

from dsjax.config import ConfigError, DataConfig


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # 1-D integer token ids (may be a np.memmap), training split
    val: np.ndarray  # 1-D integer token ids, held-out split
    vocab_size: int | None  # tokenizer's vocabulary size (256 for bytes); None for token files
    encode: Callable[[str], list[int]] | None  # None for token files, which carry no tokenizer
    decode: Callable[[Sequence[int]], str]
    description: str  # one line, for logs


def _byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _byte_decode(ids: Sequence[int]) -> str:
    # A model with a padded vocabulary can sample ids >= 256; 0xFF never occurs in UTF-8, so it decodes
    # to U+FFFD like any other invalid byte instead of raising.
    return bytes(int(t) if 0 <= t < 256 else 0xFF for t in ids).decode("utf-8", errors="replace")


def _dtype_for(vocab_size: int) -> type:
    """The narrowest unsigned dtype holding every id: memory is the only cost of a corpus."""
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


def _val_indices(n_docs: int, val_fraction: float) -> set[int] | None:
    """Documents held out: round(n_docs * val_fraction) of them, evenly spaced through the sorted list.

    Evenly spaced (not the last ones) so that val samples the whole tree, not one package. None when
    that rounds to no document: then the caller holds out the tail of the token stream instead.
    """
    n_val = min(round(n_docs * val_fraction), n_docs - 1)
    if n_val < 1:
        return None
    return {int((j + 0.5) * n_docs / n_val) for j in range(n_val)}


def _join(docs: list[np.ndarray], sep: np.ndarray, dtype: type) -> np.ndarray:
    parts = [p for k, d in enumerate(docs) for p in ((sep, d) if k else (d,))]
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _split(docs: list[np.ndarray], sep: np.ndarray, val_fraction: float, dtype: type) -> tuple:
    """(train, val, how): a held-out split by document, or of the last tokens if there are too few documents."""
    held = _val_indices(len(docs), val_fraction)
    if held is not None:
        train = _join([d for k, d in enumerate(docs) if k not in held], sep, dtype)
        val = _join([d for k, d in enumerate(docs) if k in held], sep, dtype)
        return train, val, f"{len(docs) - len(held)} train / {len(held)} val files"
    tokens = _join(docs, sep, dtype)
    n_val = max(1, round(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:], f"{len(docs)} file(s), last {val_fraction:g} of tokens held out"


def _check_splits(train: np.ndarray, val: np.ndarray, where: str) -> None:
    if len(train) == 0 or len(val) == 0:
        raise ConfigError(
            f"data.path: {where} gives {len(train)} train and {len(val)} val tokens; both splits need tokens "
            "(add data, or change data.val_fraction)."
        )


def _stdlib_files() -> tuple[str, list[str]]:
    """(root, relative paths): the stdlib's .py files, sorted by '/'-joined path (machine-independent)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}  # third-party code and test suites
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        rel = os.path.relpath(dirpath, root)
        rels += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py")]
    return root, sorted(r.replace(os.sep, "/") for r in rels)


def _load_default(data: DataConfig) -> Corpus:
    root, rels = _stdlib_files()
    docs = []
    for rel in rels:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                docs.append(np.frombuffer(f.read(), np.uint8))
        except OSError:
            continue  # an unreadable file (permissions, broken link) only shrinks the corpus
    train, val, how = _split(docs, np.array([10], np.uint8), data.val_fraction, np.uint8)
    _check_splits(train, val, f"the standard library at {root}")
    desc = f"stdlib .py files: {how}, {len(train) / 1e6:.1f}M train tokens (bytes)"
    return Corpus(train, val, 256, _byte_encode, _byte_decode, desc)


def _text_files(path: str) -> list[str]:
    """Regular files under `path`, sorted by relative path; hidden files and directories are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    files = [f for f in found if os.path.isfile(f)]
    return sorted(files, key=lambda f: os.path.relpath(f, path).replace(os.sep, "/"))


def _hf_tokenizer(spec: str):
    if not os.path.isfile(spec):
        raise ConfigError(
            f"data.tokenizer={spec!r} is neither 'bytes' nor an existing file; give the path of a Hugging Face "
            "tokenizer.json."
        )
    try:
        import tokenizers  # lazily: only this source needs it
    except ImportError:
        raise ConfigError(
            f"data.tokenizer={spec!r} needs the Hugging Face tokenizers package: pip install tokenizers"
        ) from None
    try:
        return tokenizers.Tokenizer.from_file(spec)
    except Exception as e:
        raise ConfigError(f"data.tokenizer={spec!r} is not a readable tokenizer.json: {e}") from None


def _load_text(data: DataConfig) -> Corpus:
    files = [data.path] if os.path.isfile(data.path) else _text_files(data.path)
    if not files:
        raise ConfigError(f"data.path={data.path!r} is a directory with no (non-hidden) files in it.")
    raws, texts = [], []
    for name in files:
        try:
            raw = pathlib.Path(name).read_bytes()
            texts.append(raw.decode("utf-8"))
        except OSError as e:
            raise ConfigError(f"data.path: cannot read {name}: {e}") from None
        except UnicodeDecodeError as e:
            # Rejected rather than skipped: a binary file in a text corpus is more likely a mistake.
            raise ConfigError(
                f"data.path: {name} is not valid UTF-8 (bad byte at offset {e.start} of {len(raw)}); "
                "data.source='text' reads UTF-8 text: convert or remove it (or use data.source='tokens')."
            ) from None
        raws.append(raw)
    if data.tokenizer == "bytes":
        vocab, dtype, encode, decode = 256, np.uint8, _byte_encode, _byte_decode
        docs = [np.frombuffer(r, np.uint8) for r in raws]
        sep, tok_name = np.array([10], np.uint8), "bytes"
    else:
        tok = _hf_tokenizer(data.tokenizer)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = _dtype_for(vocab)
        docs = [np.asarray(e.ids, np.int64) for e in tok.encode_batch(texts)]
        # Documents are encoded with the tokenizer's defaults, so its post-processor's BOS/EOS (if any)
        # also marks boundaries; the newline between them may encode to nothing (whitespace pre-tokenizers).
        sep = np.asarray(tok.encode("\n", add_special_tokens=False).ids, np.int64)
        tok_name = f"{os.path.basename(data.tokenizer)} (vocab {vocab})"

        def encode(s: str) -> list[int]:
            return tok.encode(s).ids

        def decode(ids: Sequence[int]) -> str:
            return tok.decode([int(t) for t in ids])

    if sum(len(d) for d in docs) == 0:
        raise ConfigError(f"data.path={data.path!r}: {len(files)} file(s) but no tokens (empty files?).")
    train, val, how = _split(docs, sep, data.val_fraction, dtype)
    _check_splits(train, val, repr(data.path))
    desc = f"text {data.path}: {how}, {len(train) / 1e6:.1f}M train tokens, tokenizer {tok_name}"
    return Corpus(train, val, vocab, encode, decode, desc)


def _memmap(path: str) -> np.memmap:
    size = os.path.getsize(path)
    if size == 0 or size % 2:
        raise ConfigError(
            f"data.path: {path} has {size} bytes; data.source='tokens' expects nanoGPT's format: a non-empty "
            "flat array of little-endian uint16 token ids (2 bytes each), so an even, non-zero size."
        )
    return np.memmap(path, dtype="<u2", mode="r")


def _token_decode(ids: Sequence[int]) -> str:
    return " ".join(str(int(t)) for t in ids)


def _load_tokens(data: DataConfig) -> Corpus:
    if os.path.isdir(data.path):
        names = [os.path.join(data.path, n) for n in ("train.bin", "val.bin")]
        missing = [n for n in names if not os.path.isfile(n)]
        if missing:
            raise ConfigError(
                f"data.path={data.path!r} is a directory, so it must hold train.bin and val.bin "
                f"(nanoGPT's layout); missing: {', '.join(missing)}."
            )
        train, val = _memmap(names[0]), _memmap(names[1])
        how = "train.bin / val.bin"
    else:
        tokens = _memmap(data.path)
        n_val = max(1, round(len(tokens) * data.val_fraction))
        train, val = tokens[:-n_val], tokens[-n_val:]  # slices of a memmap stay memory-mapped
        how = f"last {data.val_fraction:g} held out"
        _check_splits(train, val, repr(data.path))
    desc = f"tokens {data.path}: {how}, {len(train) / 1e6:.1f}M train / {len(val) / 1e6:.2f}M val tokens (uint16)"
    # The vocabulary is unknown: max(id) + 1 would read the whole memmap. `global_batch` checks the ids
    # of every batch it loads against the model's vocabulary instead.
    return Corpus(train, val, None, None, _token_decode, desc)


def load_corpus(data: DataConfig) -> Corpus | None:
    """The corpus that `data` names; None for data.source='synthetic' (use `SyntheticSamples`)."""
    if data.source == "synthetic":
        return None
    if data.source == "default":
        return _load_default(data)
    # '~' is not expanded by the shell inside --data.path=~/x, so expand it here.
    tokenizer = data.tokenizer if data.tokenizer == "bytes" else os.path.expanduser(data.tokenizer)
    data = dataclasses.replace(data, path=os.path.expanduser(data.path), tokenizer=tokenizer)
    if not (os.path.isfile(data.path) or os.path.isdir(data.path)):
        what = "is neither a regular file nor a directory" if os.path.exists(data.path) else "does not exist"
        raise ConfigError(f"data.path={data.path!r} {what} (data.source={data.source!r}).")
    return _load_text(data) if data.source == "text" else _load_tokens(data)


def _seed32(seed: int) -> int:
    """`seed` hashed to 32 bits. grain seeds epoch e with seed + e, so raw seeds s and s + 1 would share
    orders one epoch apart; hashed seeds are far apart."""
    return int(np.random.SeedSequence(seed % 2**64).generate_state(1, np.uint32)[0])


def _index(i: int) -> int:
    if operator.index(i) < 0:
        raise IndexError(f"sample index must be >= 0, got {i}")
    return operator.index(i)


class WindowSamples:
    """Random-access training samples: windows of seq_len + 1 tokens cut from a 1-D token array.

    The array is cut into n = (len(tokens) - 1) // seq_len non-overlapping windows (window w starts at
    token w * seq_len; consecutive windows share one token, the last target of one being the first input
    of the next). Sample i is in epoch i // n; with `shuffle`, each epoch visits every window once in a
    seeded order that differs per epoch. grain's MapDataset.shuffle computes that order index by index
    (a keyed bijection, no stored permutation), so any i costs O(1) time and memory.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True, *, split: str = "token"):
        if seq_len < 1:
            raise ConfigError(f"train.seq_len must be a positive integer, got {seq_len}.")
        if len(tokens) < seq_len + 1:
            raise ConfigError(
                f"data: the {split} split has {len(tokens)} tokens, fewer than train.seq_len+1 = {seq_len + 1}; "
                "use more data, a larger data.val_fraction (for the val split) or a smaller train.seq_len."
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_windows = (len(tokens) - 1) // seq_len
        order = grain.MapDataset.range(self.num_windows)
        # Without shuffle, range(n)[i] is i % n: epochs repeat in token order.
        self._order = (order.shuffle(seed=_seed32(seed)) if shuffle else order).repeat()

    def __getitem__(self, i: int) -> np.ndarray:
        """Global sample i >= 0 -> (seq_len + 1,) int32 token ids."""
        i = _index(i)
        start = int(self._order[i]) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int32)


class SyntheticSamples:
    """Uniformly random tokens, a pure function of (seed, i): benchmarks without I/O or a corpus."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def __getitem__(self, i: int) -> np.ndarray:
        """Global sample i >= 0 -> (seq_len + 1,) int32 ids in [0, vocab_size)."""
        i = _index(i)
        rng = np.random.default_rng([self.seed % 2**64, i])
        return rng.integers(0, self.vocab_size, size=self.seq_len + 1, dtype=np.int32)


def host_batch(samples, step: int, batch_size: int, rows: slice | None = None) -> np.ndarray:
    """Rows [rows.start, rows.stop) of global batch `step` (all rows if None): (n_rows, seq_len + 1) int32.

    Row r of batch `step` is sample step * batch_size + r, whoever loads it.
    """
    start, stop, stride = (rows or slice(None)).indices(batch_size)
    if stride != 1:
        raise ValueError(f"host_batch needs contiguous rows (slice step 1), got {rows}")
    base = step * batch_size
    out = np.empty((max(stop - start, 0), samples.seq_len + 1), np.int32)
    for k, r in enumerate(range(start, stop)):
        out[k] = samples[base + r]
    return out


def _process_block(sharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Per dimension, the one contiguous range of indices that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map(shape)
    block = []
    for dim, size in enumerate(shape):
        ranges = sorted({idx[dim].indices(size)[:2] for idx in index_map.values()})
        lo, hi = ranges[0][0], ranges[0][1]
        for a, b in ranges[1:]:
            if a > hi:
                raise ConfigError(
                    f"global_batch: process {jax.process_index()} holds indices {ranges} of dimension {dim} "
                    f"(size {size}) of the batch, not one contiguous block; build the mesh so that each "
                    "process's devices are adjacent along the batch axes (jax.make_mesh does this)."
                )
            hi = max(hi, b)
        block.append(slice(lo, hi))
    return tuple(block)


def global_batch(
    samples, step: int, batch_size: int, sharding: jax.sharding.NamedSharding, vocab_size: int | None = None
) -> jax.Array:
    """Global batch `step` as a (batch_size, seq_len + 1) int32 jax.Array laid out by `sharding`.

    Each process loads only the rows (and columns) its addressable devices hold. With `vocab_size`, an
    id outside the model's vocabulary is an error (an embedding lookup would silently clamp it).
    """
    shape = (batch_size, samples.seq_len + 1)
    rows, cols = _process_block(sharding, shape)
    local = host_batch(samples, step, batch_size, rows)[:, cols]
    if vocab_size is not None and local.size and int(local.max()) >= vocab_size:
        raise ConfigError(
            f"batch {step} holds token id {int(local.max())}, outside model.vocab_size = {vocab_size}; "
            "set --model.vocab_size to more than the largest id in the data."
        )
    return jax.make_array_from_process_local_data(sharding, local, shape)
