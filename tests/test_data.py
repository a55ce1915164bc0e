"""dsjax.data: corpus sources, their errors, the deterministic sample order and sharded batches."""

import pathlib

import jax
import numpy as np
import pytest

from dsjax import data
from dsjax.config import ConfigError, DataConfig


@pytest.fixture(scope="module")
def stdlib():
    return data.load_corpus(DataConfig(source="default"))


def test_default_source_loads_the_stdlib(stdlib):
    assert stdlib.vocab_size == 256
    assert stdlib.train.dtype == np.uint8 and stdlib.train.ndim == 1
    assert len(stdlib.train) > 1_000_000 and len(stdlib.val) > 10_000
    assert "stdlib" in stdlib.description and "val files" in stdlib.description
    text = "def f(x):\n    return 'héllo ✓'\n"
    assert stdlib.decode(stdlib.encode(text)) == text
    assert stdlib.decode([104, 105, 300]) == "hi\ufffd"  # ids outside the byte range decode, not raise


def test_default_split_is_by_file_and_deterministic(stdlib):
    root, rels = data._stdlib_files()
    assert rels == sorted(rels) and not any(p.split("/")[0] in ("test", "site-packages") for p in rels)
    assert not any("/tests/" in p or "idle_test" in p for p in rels)
    held = data._val_indices(len(rels), 0.02)
    assert 0 < len(held) < len(rels) // 10 and min(held) > 0 and max(held) < len(rels) - 1  # spread out

    def read(ks):
        return b"\n".join(pathlib.Path(root, rels[k]).read_bytes() for k in ks)

    assert stdlib.val.tobytes() == read(sorted(held))
    assert stdlib.train.tobytes() == read(k for k in range(len(rels)) if k not in held)
    again = data.load_corpus(DataConfig(source="default"))
    np.testing.assert_array_equal(again.train, stdlib.train)
    np.testing.assert_array_equal(again.val, stdlib.val)


def _write_docs(tmp_path, n=8):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.txt").write_text("SECRET")
    (root / ".skip").write_text("SECRET")
    docs = [f"document {k}: the quick brown fox jumps over the lazy dog {k * 7}. ünïcode\n" * 3 for k in range(n)]
    for k, doc in enumerate(docs):
        (root / ("sub" if k % 2 else "") / f"f{k}.txt").write_text(doc)
    order = sorted(range(n), key=lambda k: ("sub/" if k % 2 else "") + f"f{k}.txt")
    return root, [docs[k] for k in order]


def test_text_directory_with_bytes(tmp_path):
    root, docs = _write_docs(tmp_path)
    corpus = data.load_corpus(DataConfig(source="text", path=str(root), val_fraction=0.25))
    held = data._val_indices(len(docs), 0.25)
    assert held == {2, 6}
    assert corpus.vocab_size == 256 and corpus.train.dtype == np.uint8
    assert corpus.val.tobytes() == "\n".join(docs[k] for k in sorted(held)).encode()
    assert corpus.train.tobytes() == "\n".join(d for k, d in enumerate(docs) if k not in held).encode()
    assert b"SECRET" not in corpus.train.tobytes() + corpus.val.tobytes()
    assert corpus.decode(corpus.encode("ünï")) == "ünï"


def _train_tokenizer(tmp_path, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return tok, str(path)


def test_text_directory_with_tokenizer(tmp_path):
    root, docs = _write_docs(tmp_path)
    tok, path = _train_tokenizer(tmp_path, docs)
    corpus = data.load_corpus(DataConfig(source="text", path=str(root), tokenizer=path, val_fraction=0.25))
    assert corpus.vocab_size == tok.get_vocab_size() > 256 and corpus.train.dtype == np.uint16
    s = "the lazy fox, ünïcode!"
    assert corpus.encode(s) == tok.encode(s).ids and corpus.decode(corpus.encode(s)) == s
    sep = tok.encode("\n").ids
    want_val = tok.encode(docs[2]).ids + sep + tok.encode(docs[6]).ids
    np.testing.assert_array_equal(corpus.val, want_val)
    assert corpus.decode(corpus.train) == "\n".join(d for k, d in enumerate(docs) if k not in (2, 6))


def test_text_single_file_tail_split(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij" * 100)
    corpus = data.load_corpus(DataConfig(source="text", path=str(f), val_fraction=0.1))
    assert len(corpus.train) == 900 and len(corpus.val) == 100
    assert corpus.train.tobytes() + corpus.val.tobytes() == f.read_bytes()


def test_tokens_directory_and_single_file(tmp_path):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 50257, 5000, dtype=np.uint16), rng.integers(0, 50257, 700, dtype=np.uint16)
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    corpus = data.load_corpus(DataConfig(source="tokens", path=str(tmp_path)))
    assert isinstance(corpus.train, np.memmap) and isinstance(corpus.val, np.memmap)
    np.testing.assert_array_equal(corpus.train, train)
    np.testing.assert_array_equal(corpus.val, val)
    assert corpus.vocab_size is None and corpus.encode is None and corpus.decode([1, 50000]) == "1 50000"

    single = data.load_corpus(DataConfig(source="tokens", path=str(tmp_path / "train.bin"), val_fraction=0.1))
    assert isinstance(single.train, np.memmap) and len(single.val) == 500
    np.testing.assert_array_equal(np.concatenate([single.train, single.val]), train)

    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ConfigError, match=r"data\.path.*3 bytes"):
        data.load_corpus(DataConfig(source="tokens", path=str(tmp_path / "odd.bin")))
    (tmp_path / "nodir").mkdir()
    with pytest.raises(ConfigError, match=r"data\.path.*train\.bin"):
        data.load_corpus(DataConfig(source="tokens", path=str(tmp_path / "nodir")))


def test_synthetic_source_has_no_corpus():
    assert data.load_corpus(DataConfig(source="synthetic")) is None


def test_bad_inputs_raise_config_errors_naming_the_field(tmp_path):
    def raises(match, **kw):
        with pytest.raises(ConfigError, match=match):
            data.load_corpus(DataConfig(**kw))

    raises(r"data\.path.*does not exist", source="text", path=str(tmp_path / "missing"))
    raises(r"data\.path.*does not exist", source="tokens", path=str(tmp_path / "missing.bin"))
    (tmp_path / "empty").mkdir()
    raises(r"data\.path.*no \(non-hidden\) files", source="text", path=str(tmp_path / "empty"))
    (tmp_path / "empty.txt").write_text("")
    raises(r"data\.path.*no tokens", source="text", path=str(tmp_path / "empty.txt"))
    (tmp_path / "empty.bin").write_bytes(b"")
    raises(r"data\.path.*0 bytes", source="tokens", path=str(tmp_path / "empty.bin"))
    (tmp_path / "bin.txt").write_bytes(b"ok\xff\xfe")
    raises(r"data\.path.*not valid UTF-8.*offset 2", source="text", path=str(tmp_path / "bin.txt"))
    (tmp_path / "a.txt").write_text("x")
    raises(r"data\.path.*1 train.*0 val|0 train.*1 val", source="text", path=str(tmp_path / "a.txt"))
    (tmp_path / "t.txt").write_text("hello world")
    raises(r"data\.tokenizer", source="text", path=str(tmp_path / "t.txt"), tokenizer=str(tmp_path / "nope.json"))
    raises(
        r"data\.tokenizer.*tokenizer\.json",
        source="text",
        path=str(tmp_path / "t.txt"),
        tokenizer=str(tmp_path / "a.txt"),
    )
    with pytest.raises(ConfigError, match=r"train split has 100 tokens, fewer than train\.seq_len\+1 = 257"):
        data.WindowSamples(np.zeros(100, np.uint16), 256, seed=0, split="train")


def test_window_samples_cover_each_window_once_per_epoch():
    tokens = np.arange(1000, dtype=np.uint16)
    seq_len, n = 10, 99
    ws = data.WindowSamples(tokens, seq_len, seed=3)
    assert ws.num_windows == n

    def starts(samples, epoch):
        out = []
        for i in range(epoch * n, (epoch + 1) * n):
            s = samples[i]
            assert s.shape == (seq_len + 1,) and s.dtype == np.int32
            np.testing.assert_array_equal(s, np.arange(s[0], s[0] + seq_len + 1))  # a contiguous slice
            out.append(int(s[0]))
        assert sorted(out) == list(range(0, n * seq_len, seq_len))  # every window exactly once
        return out

    e0, e1, e5 = starts(ws, 0), starts(ws, 1), starts(ws, 5)
    assert e0 != sorted(e0) and e0 != e1 and e1 != e5
    assert starts(data.WindowSamples(tokens, seq_len, seed=3), 0) == e0
    assert starts(data.WindowSamples(tokens, seq_len, seed=4), 0) != e0
    # Seeds s and s + 1 must not share epoch orders shifted by one (grain seeds epoch e with seed + e).
    assert starts(data.WindowSamples(tokens, seq_len, seed=4), 0) != e1
    plain = data.WindowSamples(tokens, seq_len, seed=3, shuffle=False)
    assert [int(plain[i][0]) for i in (0, 1, n - 1, n, n + 2)] == [0, 10, (n - 1) * 10, 0, 20]


def test_host_batch_rows_and_global_batch():
    samples = data.WindowSamples(np.arange(5000) % 251, 16, seed=1)
    full = data.host_batch(samples, step=7, batch_size=16)
    assert full.shape == (16, 17) and full.dtype == np.int32
    np.testing.assert_array_equal(full[5], samples[7 * 16 + 5])
    np.testing.assert_array_equal(data.host_batch(samples, 7, 16, slice(4, 12)), full[4:12])
    assert not np.array_equal(data.host_batch(samples, 8, 16), full)

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharding = jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None))
    batch = data.global_batch(samples, 7, 16, sharding)
    assert batch.shape == (16, 17) and batch.dtype == np.int32 and batch.sharding == sharding
    assert len(batch.addressable_shards) == 8 and batch.addressable_shards[1].data.shape == (2, 17)
    np.testing.assert_array_equal(np.asarray(batch), full)


def test_non_contiguous_process_rows_are_rejected():
    class TwoBlocks:  # what a process would see if its devices held rows 0:2 and 4:6 of 8
        def addressable_devices_indices_map(self, shape):
            return {0: (slice(0, 2), slice(None)), 1: (slice(4, 6), slice(None))}

    class Replicated:
        def addressable_devices_indices_map(self, shape):
            return {0: (slice(2, 6), slice(None)), 1: (slice(2, 4), slice(None)), 2: (slice(4, 6), slice(None))}

    assert data._process_block(Replicated(), (8, 5)) == (slice(2, 6), slice(0, 5))
    with pytest.raises(ConfigError, match="not one contiguous block"):
        data._process_block(TwoBlocks(), (8, 5))


def test_synthetic_samples():
    a, b = data.SyntheticSamples(100, 32, seed=0), data.SyntheticSamples(100, 32, seed=0)
    s = a[5]
    assert s.shape == (33,) and s.dtype == np.int32 and s.min() >= 0 and s.max() < 100
    np.testing.assert_array_equal(s, b[5])
    assert not np.array_equal(a[5], a[6])
    assert not np.array_equal(a[5], data.SyntheticSamples(100, 32, seed=1)[5])
    assert data.host_batch(a, 3, 4).shape == (4, 33)


def test_global_batch_rejects_ids_outside_the_vocab(tmp_path):
    np.arange(600, dtype=np.uint16).tofile(tmp_path / "all.bin")
    corpus = data.load_corpus(DataConfig(source="tokens", path=str(tmp_path / "all.bin")))
    samples = data.WindowSamples(corpus.train, 16, seed=0)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.P("data", None))
    assert data.global_batch(samples, 0, 8, sharding, vocab_size=1000).shape == (8, 17)
    with pytest.raises(ConfigError, match=r"model\.vocab_size = 500"):
        data.global_batch(samples, 0, 8, sharding, vocab_size=500)
