"""Token corpora and the batches drawn from them.

Rules this module keeps:
- A corpus is a 1-D array of token ids: the bytes of a text file (vocab 256), or a binary file
  of uint16/uint32 ids opened with np.memmap (never read whole into memory).
- The last `val_fraction` of the tokens is the validation split, the rest is training.
- **A global batch is a function of (seed, split, step) only**: its start offsets come from
  `np.random.default_rng([seed, split, step])`, drawn without replacement so no sequence repeats
  within a step. A rank takes a contiguous block of rows of it (`rows_for_rank`), so the sequence
  of global batches does not depend on how many data-parallel ranks share them, and resuming
  at step s needs nothing but s.
- Too short a corpus is an error naming the file and the lengths, before any training.
Tests: tests/test_data.py.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRAIN, VAL = 0, 1  # the split id is part of the RNG key, so the two streams never coincide

_SUFFIX_FORMAT = {".txt": "text", ".text": "text", ".md": "text", ".u16": "u16", ".u32": "u32"}
_DTYPES = {"u16": np.dtype("<u2"), "u32": np.dtype("<u4")}


class DataError(ValueError):
    """A corpus that cannot be used as configured."""


def resolve_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix in _SUFFIX_FORMAT:
        return _SUFFIX_FORMAT[path.suffix]
    if path.suffix == ".bin":
        raise DataError(f"{path}: a .bin token file needs its dtype: set data.format = \"u16\" or \"u32\"")
    raise DataError(
        f"{path}: cannot tell the format from the suffix {path.suffix!r}; name it .txt/.u16/.u32 or set "
        f"data.format to text, u16 or u32")


def load_tokens(path, fmt: str = "auto") -> tuple[np.ndarray, str]:
    """(1-D token array, resolved format). Text is read as raw bytes, binary ids are memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: corpus file not found (data.path)")
    fmt = resolve_format(path, fmt)
    if fmt == "text":
        return np.fromfile(path, dtype=np.uint8), fmt
    if fmt not in _DTYPES:
        raise DataError(f"{path}: unknown data.format {fmt!r}; use text, u16 or u32")
    dtype = _DTYPES[fmt]
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of {fmt} tokens ({dtype.itemsize} bytes each); "
            f"the file is truncated or data.format is wrong")
    if size == 0:
        return np.zeros(0, dtype), fmt
    return np.memmap(path, dtype=dtype, mode="r"), fmt


def max_token(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """Largest id, in chunks so a memory-mapped corpus is scanned without a full copy."""
    if tokens.dtype == np.uint8:
        return 255 if len(tokens) else -1
    return max((int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk)), default=-1)


@dataclass
class Corpus:
    path: Path
    format: str
    train: np.ndarray
    val: np.ndarray

    @property
    def tokenizer(self) -> dict | None:
        """The `cke_tokenizer.json` content for checkpoints, when the ids are bytes."""
        return {"type": "bytes"} if self.format == "text" else None


def open_corpus(path, fmt: str, val_fraction: float, seq_len: int, vocab_size: int) -> Corpus:
    """Load, check ids against the vocabulary and lengths against one sequence, and split."""
    tokens, fmt = load_tokens(path, fmt)
    path = Path(path)
    top = max_token(tokens) if fmt != "text" else 255
    if top >= vocab_size:
        raise DataError(
            f"{path}: holds token id {top}, but the model's vocab_size is {vocab_size}; "
            f"{'byte tokens need vocab_size >= 256' if fmt == 'text' else 'use a model with a larger vocabulary'}")
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    need = seq_len + 1  # inputs and the targets shifted by one
    for name, split in (("training", train), ("validation", val)):
        if len(split) < need:
            raise DataError(
                f"{path}: the {name} split has {len(split)} tokens (corpus {len(tokens)} tokens, "
                f"val_fraction {val_fraction}), shorter than one sequence of seq_len + 1 = {need}; "
                f"use a longer corpus or a smaller data.seq_len")
    return Corpus(path, fmt, train, val)


def rows_for_rank(batch_size: int, rank: int, world_size: int) -> slice:
    """Rows [r*B/n, (r+1)*B/n) of a global batch of B rows: rank r's share."""
    if batch_size % world_size:
        raise DataError(
            f"data.batch_size {batch_size} is not divisible by the {world_size} data-parallel ranks")
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


class BatchSampler:
    """Global batches of `rows` sequences of seq_len (+1 for the targets) from one split."""

    def __init__(self, tokens: np.ndarray, rows: int, seq_len: int, seed: int, split: int, path=None):
        self.tokens, self.rows, self.seq_len, self.seed, self.split = tokens, rows, seq_len, seed, split
        self.n_starts = len(tokens) - seq_len  # valid start offsets: start + seq_len + 1 <= len
        if self.n_starts < rows:
            raise DataError(
                f"{path or 'corpus'}: {len(tokens)} tokens give {max(self.n_starts, 0)} distinct sequences "
                f"of {seq_len} + 1, fewer than the {rows} rows of one global batch; use a longer corpus, "
                f"a smaller data.seq_len or a smaller data.batch_size * data.grad_accum")

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets of every row of the global batch at `step` (the same on every rank)."""
        rng = np.random.default_rng([self.seed, self.split, step])
        return rng.choice(self.n_starts, size=self.rows, replace=False)

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), int64 (rows, seq_len), for the selected rows of the global batch."""
        starts = self.offsets(step)[rows]
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        seqs = np.asarray(self.tokens[idx], dtype=np.int64)
        return seqs[:, :-1], seqs[:, 1:]

    def micro_batch(self, step: int, micro: int, micro_rows: int, rank: int = 0, world_size: int = 1):
        """Rank `rank`'s share of micro-batch `micro` (micro_rows rows each) of the global batch at `step`.

        Micro-batch k is rows [k*micro_rows, (k+1)*micro_rows) of the global batch; the rank takes its
        block of that, so accumulation and data parallelism only regroup the same rows.
        """
        share = rows_for_rank(micro_rows, rank, world_size)
        base = micro * micro_rows
        return self.batch(step, slice(base + share.start, base + share.stop))
