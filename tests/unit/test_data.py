"""Corpora and batches: byte and binary tokens, split, determinism, rank shares, bad input."""

import numpy as np
import pytest

from mpirun import REPO

from cke_dist.formats.tokenizer import ByteTokenizer
from cke_dist.train.data import TRAIN, VAL, BatchSampler, DataError, load_tokens, open_corpus, rows_for_rank

SHAKESPEARE = REPO / "examples" / "data" / "tinyshakespeare.txt"


BYTES = ByteTokenizer()   # text here is read byte by byte, as the built-in model reads it


def test_text_is_bytes_and_split(tmp_path):
    p = tmp_path / "t.txt"
    text = "héllo world\n" * 50
    p.write_text(text, encoding="utf-8")
    c = open_corpus(p, "auto", 0.1, seq_len=8, vocab_size=256, tokenizer=BYTES)
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    n_val = int(len(raw) * 0.1)
    np.testing.assert_array_equal(c.train, raw[:len(raw) - n_val])
    np.testing.assert_array_equal(c.val, raw[len(raw) - n_val:])
    assert c.format == "text"


@pytest.mark.parametrize("fmt,dtype,suffix", [("u16", np.uint16, ".u16"), ("u32", np.uint32, ".u32"),
                                              ("u16", np.uint16, ".bin")])
def test_binary_tokens_memmapped(tmp_path, fmt, dtype, suffix):
    ids = (np.arange(5000) * 7919 % 70000 % (65535 if dtype == np.uint16 else 70000)).astype(dtype)
    p = tmp_path / f"tok{suffix}"
    ids.tofile(p)
    tokens, got_fmt = load_tokens(p, "auto" if suffix != ".bin" else fmt)
    assert isinstance(tokens, np.memmap) and got_fmt == fmt
    np.testing.assert_array_equal(tokens, ids)
    c = open_corpus(p, fmt, 0.2, seq_len=16, vocab_size=int(ids.max()) + 1)
    x, y = BatchSampler(c.train, 4, 16, seed=1, split=TRAIN).batch(0)
    assert x.dtype == np.int64 and x.shape == (4, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    with pytest.raises(DataError, match=r"tok.*token id \d+.*vocab_size is 10"):
        open_corpus(p, fmt, 0.2, seq_len=16, vocab_size=10)


def test_batches_are_corpus_slices_and_deterministic():
    c = open_corpus(SHAKESPEARE, "auto", 0.1, 64, 256, tokenizer=BYTES)
    s = BatchSampler(c.train, rows=8, seq_len=64, seed=3, split=TRAIN)
    x, y = s.batch(5)
    for row, start in enumerate(s.offsets(5)):
        np.testing.assert_array_equal(x[row], c.train[start:start + 64])
        np.testing.assert_array_equal(y[row], c.train[start + 1:start + 65])
    x2, _ = BatchSampler(c.train, rows=8, seq_len=64, seed=3, split=TRAIN).batch(5)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(s.batch(6)[0], x)
    assert not np.array_equal(BatchSampler(c.train, 8, 64, seed=4, split=TRAIN).batch(5)[0], x)
    assert not np.array_equal(BatchSampler(c.train, 8, 64, seed=3, split=VAL).offsets(5), s.offsets(5))
    assert len(set(s.offsets(5).tolist())) == 8  # drawn without replacement


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_shares_rebuild_the_global_batch(world_size):
    c = open_corpus(SHAKESPEARE, "auto", 0.1, 32, 256, tokenizer=BYTES)
    grad_accum, micro_rows = 3, 8
    s = BatchSampler(c.train, rows=grad_accum * micro_rows, seq_len=32, seed=0, split=TRAIN)
    for step in (0, 17):
        gx, gy = s.batch(step)
        parts = [s.micro_batch(step, k, micro_rows, r, world_size)
                 for k in range(grad_accum) for r in range(world_size)]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), gx)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), gy)
    assert rows_for_rank(8, 1, 4) == slice(2, 4)
    with pytest.raises(DataError, match="batch_size 6 is not divisible by the 4"):
        rows_for_rank(6, 0, 4)


def test_short_corpus_names_file_and_lengths(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("x" * 100)
    with pytest.raises(DataError, match=r"short\.txt.*training split has 90 tokens.*seq_len \+ 1 = 129"):
        open_corpus(p, "auto", 0.1, seq_len=128, vocab_size=256, tokenizer=BYTES)
    with pytest.raises(DataError, match=r"short\.txt.*validation split has 10 tokens"):
        open_corpus(p, "auto", 0.1, seq_len=20, vocab_size=256, tokenizer=BYTES)
    c = open_corpus(p, "auto", 0.1, seq_len=8, vocab_size=256, tokenizer=BYTES)
    with pytest.raises(DataError, match=r"short\.txt.*fewer than the 200 rows"):
        BatchSampler(c.train, 200, 8, 0, TRAIN, path=p)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_tokens(tmp_path / "missing.txt", tokenizer=BYTES)
    b = tmp_path / "ids.bin"
    b.write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match=r"ids\.bin.*data\.format"):
        load_tokens(b)
    odd = tmp_path / "ids.u32"
    odd.write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match=r"ids\.u32.*10 bytes.*truncated"):
        load_tokens(odd)
    weird = tmp_path / "ids.dat"
    weird.write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match=r"ids\.dat.*suffix"):
        load_tokens(weird)
    with pytest.raises(DataError, match="vocab_size >= 256"):
        open_corpus(SHAKESPEARE, "text", 0.1, 8, vocab_size=128, tokenizer=BYTES)


def test_text_without_a_tokenizer_is_refused_with_what_to_do(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("some text\n")
    with pytest.raises(DataError, match=r"t\.txt is text, but the model has no tokenizer.*give token ids"):
        open_corpus(p, "auto", 0.1, seq_len=4, vocab_size=256)
