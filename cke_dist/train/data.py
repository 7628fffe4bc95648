"""Token corpora and the batches drawn from them.

Rules this module keeps:
- A corpus is a 1-D array of token ids, from `data.path`: a file, a directory (its .txt / .md /
  .jsonl / .u16 / .u32 files, sorted) or a glob. Text (.txt, .md: one document per file; .jsonl:
  one per line, its "text" field) is tokenized with the model's own tokenizer, an end-of-text id
  after each document, and cached as a prepared token file keyed by the tokenizer's fingerprint
  and the sources' paths, sizes and times (`prepare_tokens`; `cke-dist prepare` does it ahead of
  time). A byte-level model (ours, no tokenizer file) reads text as its UTF-8 bytes. Prepared ids
  (.u16/.u32) are memory-mapped, never read whole into memory. Text for a model with no tokenizer
  is an error that says what to give instead: ids never silently change meaning.
- `data.val_path` names held-out files; without it the last `val_fraction` of the tokens is the
  validation split, the rest is training.
- **A global batch is a function of (seed, split, step) only**: its start offsets come from
  `np.random.default_rng([seed, split, step])`, drawn without replacement so no sequence repeats
  within a step. A rank takes a contiguous block of rows of it (`rows_for_rank`), so the sequence
  of global batches does not depend on how many data-parallel ranks share them, and resuming
  at step s needs nothing but s.
- Packing (`data.pack`, the sampler given the end-of-text id): a window's documents keep to
  themselves: batches carry positions that restart after each end-of-text token (which ends its
  document), and the model's attention never crosses them.
- Too short a corpus is an error naming the file and the lengths, before any training.
Tests: tests/unit/test_data.py.
"""
import fcntl
import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cke_dist.formats.tokenizer import ByteTokenizer

TRAIN, VAL = 0, 1  # the split id is part of the RNG key, so the two streams never coincide

_SUFFIX_FORMAT = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".u16": "u16", ".u32": "u32"}
DOCUMENTS = ("text", "jsonl")      # formats the tokenizer reads; the others are token ids already
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
        f"{path}: cannot tell the format from the suffix {path.suffix!r}; name it .txt/.jsonl/.u16/.u32 or set "
        f"data.format to text, jsonl, u16 or u32")


def data_files(path) -> list[Path]:
    """The files `data.path` names: a file, a directory's data files (sorted), or a glob's matches."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _SUFFIX_FORMAT)
        if not found:
            raise DataError(f"{p}: a directory with no data files ({', '.join(sorted(_SUFFIX_FORMAT))})")
        return found
    if glob.has_magic(str(path)):
        found = sorted(Path(f) for f in glob.glob(str(path)) if Path(f).is_file())
        if not found:
            raise FileNotFoundError(f"{path}: the glob matches no file (data.path)")
        return found
    raise FileNotFoundError(f"{path}: corpus file not found (data.path)")


def documents(path: Path, fmt: str):
    """The texts of one text (.txt: the whole file) or JSON-lines file (each line's "text")."""
    if fmt == "text":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                raise DataError(f"{path}:{n}: not a JSON object; a .jsonl corpus holds one {{\"text\": ...}} "
                                f"object per line") from None
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: no string \"text\" field (data.format = \"jsonl\"; chat data "
                                f"with \"messages\" needs data.format = \"chat\")")
            yield text


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cke-dist" / "tokens"


def prepare_tokens(files: list[Path], fmt: str, tokenizer, cache_dir=None, progress: bool = True) -> Path:
    """Tokenize the documents of `files` (an end-of-text id after each) into a uint32 token file,
    once: it is cached under a key of the tokenizer's fingerprint and the files' paths, sizes and
    modification times, built by one process while any other (another rank) waits on its lock."""
    h = hashlib.sha256(json.dumps({"tokenizer": tokenizer.fingerprint(), "format": fmt, "version": 1,
                                   "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns]
                                             for f in files]}).encode())
    root = Path(cache_dir) if cache_dir else _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{h.hexdigest()[:32]}.u32"
    with open(str(out) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():
            return out
        eos = tokenizer.eos_token_id
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                       desc="tokenizing", file=sys.stderr, dynamic_ncols=True)
        with open(tmp, "wb") as w:
            for f in files:
                batch: list[str] = []
                for text in list(documents(f, fmt)) + [None]:
                    if text is not None:
                        batch.append(text)
                    if batch and (text is None or len(batch) == 256):
                        for ids in tokenizer.encode_batch(batch):
                            np.asarray(ids + ([eos] if eos is not None else []), np.uint32).tofile(w)
                        batch = []
                if bar is not None:
                    bar.update(f.stat().st_size)
            w.flush()
            os.fsync(w.fileno())
        if bar is not None:
            bar.close()
        os.replace(tmp, out)
        return out


def load_tokens(path, fmt: str = "auto", tokenizer=None, cache_dir=None, progress: bool = True) -> tuple[np.ndarray, str]:
    """(1-D token array, resolved format) of the files `path` names. Text goes through `tokenizer`
    (bytes for a ByteTokenizer; None: an error), binary ids are memory-mapped."""
    files = data_files(path)
    kinds = {resolve_format(f, fmt) for f in files}
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes data formats {sorted(kinds)}; give one kind of file (or set data.format)")
    fmt = kinds.pop()
    if fmt in DOCUMENTS:
        if tokenizer is None:
            raise DataError(f"{path} is text, but the model has no tokenizer to read it with (model.init_from "
                            f"names no tokenizer.json): add the model's tokenizer files beside its weights, or "
                            f"give token ids (.u16/.u32)")
        if isinstance(tokenizer, ByteTokenizer):
            if fmt == "text":
                parts = [np.fromfile(f, dtype=np.uint8) for f in files]
                return (parts[0] if len(parts) == 1 else np.concatenate(parts)), fmt
            ids = [b for f in files for t in documents(f, fmt) for b in t.encode("utf-8")]
            return np.asarray(ids, np.uint8), fmt
        prepared = prepare_tokens(files, fmt, tokenizer, cache_dir, progress)
        size = prepared.stat().st_size
        return (np.memmap(prepared, dtype=np.uint32, mode="r") if size else np.zeros(0, np.uint32)), fmt
    if len(files) > 1:
        raise DataError(f"{path}: {len(files)} token-id files; give one ({fmt}) or prepare them into one "
                        f"with cke-dist prepare")
    path = files[0]
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


def open_corpus(path, fmt: str, val_fraction: float, seq_len: int, vocab_size: int, tokenizer=None,
                val_path=None, cache_dir=None, progress: bool = True) -> Corpus:
    """Load (tokenizing text with `tokenizer`), check ids against the vocabulary and lengths against
    one sequence, and split (the last val_fraction, or the files of val_path)."""
    tokens, fmt = load_tokens(path, fmt, tokenizer, cache_dir, progress)
    path = Path(path)
    held = load_tokens(val_path, fmt if val_path and fmt not in DOCUMENTS else "auto", tokenizer, cache_dir,
                       progress)[0] if val_path else None
    for src, ids in ((path, tokens), (val_path, held)):
        top = max_token(ids) if ids is not None else -1
        if top >= vocab_size:
            raise DataError(
                f"{src}: holds token id {top}, but the model's vocab_size is {vocab_size}; "
                f"{'byte tokens need vocab_size >= 256' if ids.dtype == np.uint8 else 'use a model with a larger vocabulary'}")
    if held is not None:
        train, val = tokens, held
    else:
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


def micro_batch_rows(micro: int, micro_rows: int, rank: int = 0, world_size: int = 1) -> slice:
    """The global batch's rows that are rank `rank`'s share of micro-batch `micro`: micro-batch k is
    rows [k*micro_rows, (k+1)*micro_rows), and the rank takes its block of that, so accumulation
    and data parallelism only regroup the same rows."""
    share = rows_for_rank(micro_rows, rank, world_size)
    return slice(micro * micro_rows + share.start, micro * micro_rows + share.stop)


def rows_for_rank(batch_size: int, rank: int, world_size: int) -> slice:
    """Rows [r*B/n, (r+1)*B/n) of a global batch of B rows: rank r's share."""
    if batch_size % world_size:
        raise DataError(
            f"data.batch_size {batch_size} is not divisible by the {world_size} data-parallel ranks")
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


def doc_positions(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """(rows, T) token ids -> each token's position in its document: 0 at a row's start and after
    every eos_id (the end-of-text token closes its own document)."""
    T = inputs.shape[1]
    t = np.arange(T)
    begins = np.zeros(inputs.shape, np.int64)
    begins[:, 1:] = np.where(inputs[:, :-1] == eos_id, t[1:], 0)
    return t - np.maximum.accumulate(begins, axis=1)


class BatchSampler:
    """Global batches of `rows` sequences of seq_len (+1 for the targets) from one split: (inputs,
    targets), or with `eos_id` (packing) (inputs, targets, positions) restarting after each eos_id."""

    def __init__(self, tokens: np.ndarray, rows: int, seq_len: int, seed: int, split: int, path=None,
                 eos_id: int | None = None):
        self.tokens, self.rows, self.seq_len, self.seed, self.split = tokens, rows, seq_len, seed, split
        self.eos_id = eos_id
        self.n_starts = len(tokens) - seq_len  # valid start offsets: start + seq_len + 1 <= len
        if self.n_starts < rows:
            raise DataError(
                f"{path or 'corpus'}: {len(tokens)} tokens give {max(self.n_starts, 0)} distinct sequences "
                f"of {seq_len} + 1, fewer than the {rows} rows of one global batch; use a longer corpus, "
                f"a smaller data.seq_len or a smaller data.batch_size * data.grad_accum")

    def _rows(self, idx):
        seqs = np.asarray(self.tokens[idx], dtype=np.int64)
        x, y = seqs[:, :-1], seqs[:, 1:]
        return (x, y) if self.eos_id is None else (x, y, doc_positions(x, self.eos_id))

    def fixed_set(self, n_tokens: int) -> tuple[np.ndarray, ...]:
        """(inputs, targets[, positions]) of the first n_tokens of the split in consecutive seq_len
        windows: the validation set, the same whatever the batch size or layout (at least one window)."""
        n = max(1, min(n_tokens // self.seq_len, (len(self.tokens) - 1) // self.seq_len))
        return self._rows(np.arange(n)[:, None] * self.seq_len + np.arange(self.seq_len + 1))

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets of every row of the global batch at `step` (the same on every rank)."""
        rng = np.random.default_rng([self.seed, self.split, step])
        return rng.choice(self.n_starts, size=self.rows, replace=False)

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, ...]:
        """(inputs, targets[, positions]), int64 (rows, seq_len), for the selected rows of the global batch."""
        starts = self.offsets(step)[rows]
        return self._rows(starts[:, None] + np.arange(self.seq_len + 1))

    def micro_batch(self, step: int, micro: int, micro_rows: int, rank: int = 0, world_size: int = 1):
        """Rank `rank`'s share of micro-batch `micro` (micro_rows rows each) of the global batch at `step`."""
        return self.batch(step, micro_batch_rows(micro, micro_rows, rank, world_size))
