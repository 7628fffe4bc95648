"""Hugging Face model directories: `config.json` + safetensors weights, read and written.

Rules this module keeps:
- A directory holds either one `model.safetensors` or shards `model-0000x-of-0000y.safetensors`
  listed by `model.safetensors.index.json` (the layout `save_pretrained` writes); when both
  exist the index wins, as in transformers.
- Every tensor comes back as a C-contiguous float32 numpy array (the compute type): bf16 and
  fp16 are widened exactly (bf16 by a bit shift), f64 is rounded; other dtypes are an error.
- A missing, truncated or inconsistent file raises `HFFormatError` (a ValueError) or
  `FileNotFoundError` whose message names the file and what was expected. The safetensors
  header is checked here before the `safetensors` package reads the data, so a short file
  is reported as truncated rather than as a deep library error.
- Files we write carry `{"format": "pt"}` metadata so `transformers.from_pretrained` loads them.
Tests: tests/unit/test_hf_io.py.
"""
import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

CONFIG_NAME = "config.json"
MANIFEST = "manifest.json"   # our checkpoints' list of files with their sha256 (cke_dist.formats.checkpoint)
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")

# safetensors dtype tag -> (numpy dtype of the stored bytes, bytes per element)
_STORED = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # numpy has no bfloat16: read the raw 16 bits
    "F64": (np.dtype("<f8"), 8),
    "I8": (np.dtype("i1"), 1),      # Q8_0 values (cke_dist.model.inference reads them raw)
    "U8": (np.dtype("u1"), 1),      # Q4_0 / Q4_1 packed values
}


class HFFormatError(ValueError):
    """A Hugging Face model directory or safetensors file that cannot be read as it is."""


def _read_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header; returns (tensor entries, byte offset of data)."""
    size = path.stat().st_size
    if size < 8:
        raise HFFormatError(f"{path}: truncated safetensors file ({size} bytes; the header length alone takes 8)")
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        if 8 + hlen > size:
            raise HFFormatError(
                f"{path}: truncated safetensors file: header says {hlen} header bytes, file has {size} bytes in all")
        raw = f.read(hlen)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupted") from None
    if not isinstance(header, dict):
        raise HFFormatError(f"{path}: safetensors header is not a JSON object; the file is corrupted")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - hlen
    for name, entry in header.items():
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise HFFormatError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if dtype not in _STORED:
            raise HFFormatError(
                f"{path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(sorted(_STORED))}")
        need = int(np.prod(shape, dtype=np.int64)) * _STORED[dtype][1]
        if stop - start != need:
            raise HFFormatError(
                f"{path}: tensor {name!r} of shape {shape} {dtype} needs {need} bytes, header gives {stop - start}")
        if stop > data_bytes:
            raise HFFormatError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at data byte {stop}, "
                f"file holds {data_bytes} data bytes")
    return header, 8 + hlen


def _widen(stored_dtype: str, arr: np.ndarray) -> np.ndarray:
    """Stored values -> a C-contiguous float32 copy (bf16 is the top half of a float32: shift it up)."""
    if stored_dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(arr, dtype=np.float32)


class SafetensorsFile:
    """One safetensors file, header checked; `read(name, index)` reads just that part of a tensor.

    The data are memory-mapped, so a tensor-parallel rank that reads its rows or columns of a
    tensor touches only those pages and holds only its shard (numpy has no bf16, so this reads
    every dtype the same way rather than through the safetensors package's numpy loader)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: safetensors file not found")
        self.header, self.data_start = _read_header(self.path)

    def names(self) -> list[str]:
        return sorted(self.header, key=lambda n: self.header[n]["data_offsets"][0])

    def shape(self, name) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name, index=(), raw: bool = False) -> np.ndarray:
        """That part of a tensor as float32, or as stored (raw=True: a copy in the file's dtype)."""
        entry = self.header[name]
        stored, _ = _STORED[entry["dtype"]]
        shape = tuple(entry["shape"])
        try:
            mm = np.memmap(self.path, dtype=stored, mode="r", offset=self.data_start + entry["data_offsets"][0],
                           shape=shape) if int(np.prod(shape, dtype=np.int64)) else np.zeros(shape, stored)
            return np.array(mm[index]) if raw else _widen(entry["dtype"], mm[index])
        except (OSError, ValueError) as e:
            raise HFFormatError(f"{self.path}: cannot read tensor {name!r}: {e}") from e


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float32 arrays (file order)."""
    f = SafetensorsFile(path)
    return {name: f.read(name) for name in f.names()}


def _read_index(index_path: Path) -> dict[str, list[str]]:
    """Shard file -> tensor names, from a `model.safetensors.index.json`."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError("weight_map must be a non-empty object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise HFFormatError(
            f"{index_path}: bad index ({type(e).__name__}: {e}); expected JSON with a non-empty "
            f"\"weight_map\" {{tensor name: shard file}}") from None
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise HFFormatError(f"{index_path}: tensor {name!r} maps to {shard!r}, not a file name in this directory")
        shards.setdefault(shard, []).append(name)
    return shards


def read_hf_config(path, check_manifest: bool = True) -> dict:
    """config.json of a Hugging Face model directory, checked to be a float (unquantized) model; the
    directory's manifest (when it has one) is verified unless the caller just did."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model directory not found")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not found; a model directory needs config.json")
    if check_manifest:
        # the weight files are verified as they are read (open_hf_tensors), here what the config comes from
        manifest = read_manifest(path)
        if manifest is not None:
            check_file(config_path, manifest["files"].get(CONFIG_NAME))
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFormatError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise HFFormatError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant is not None:
        raise HFFormatError(f"{config_path}: weights are quantized ({quant!r}); a quantized directory is for "
                            f"inference only: `cke-dist generate --model {path}` (train from the float checkpoint)")
    return config


class TensorSource:
    """HF tensor name -> its full shape and the pieces (file, stored name, region) that hold it.

    A plain HF directory stores every tensor whole in one file; a distributed checkpoint of ours
    stores each rank's slices in its own files and lists every piece's region of the full tensor
    in manifest.json. `read(name, index)` assembles any rectangular part from the pieces it
    overlaps, so a rank of any layout reads just its slices. Files are opened, and checked against
    the manifest (size, sha256), the first time a read touches them: every file a loader reads is
    verified, and none it does not need is read at all."""

    def __init__(self, root: Path, pieces: dict[str, list[tuple[str, str, tuple]]], full: dict[str, tuple],
                 manifest: dict | None = None):
        self.root, self.pieces, self.full, self.manifest = root, pieces, full, manifest
        self._open: dict[str, SafetensorsFile] = {}

    def __contains__(self, name) -> bool:
        return name in self.full

    def __iter__(self):
        return iter(self.full)

    def names(self) -> list[str]:
        return list(self.full)

    def shape(self, name) -> tuple[int, ...]:
        return self.full[name]

    def file(self, fname: str) -> SafetensorsFile:
        if fname not in self._open:
            path = self.root / fname
            if self.manifest is not None:
                check_file(path, self.manifest["files"].get(fname))
            self._open[fname] = SafetensorsFile(path)
        return self._open[fname]

    def read(self, name, index=()) -> np.ndarray:
        full = self.full[name]
        want = [(0, n) for n in full]
        for d, sl in enumerate(index):
            a, b, step = sl.indices(full[d])
            if step != 1:
                raise ValueError(f"{name}: read takes contiguous slices, got {sl}")
            want[d] = (a, b)
        out = np.empty([b - a for a, b in want], np.float32)
        covered = 0
        for fname, key, region in self.pieces[name]:
            lo = [max(a, r0) for (a, _), (r0, _) in zip(want, region)]
            hi = [min(b, r1) for (_, b), (_, r1) in zip(want, region)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            f = self.file(fname)
            if f.shape(key) != tuple(r1 - r0 for r0, r1 in region):
                raise HFFormatError(f"{f.path}: tensor {key!r} has shape {f.shape(key)}, the manifest gives it "
                                    f"the region {list(region)} of {list(full)}")
            src = tuple(slice(l - r0, h - r0) for l, h, (r0, _) in zip(lo, hi, region))
            dst = tuple(slice(l - a, h - a) for l, h, (a, _) in zip(lo, hi, want))
            out[dst] = f.read(key, src)
            covered += int(np.prod([h - l for l, h in zip(lo, hi)], dtype=np.int64))
        if covered != out.size:
            raise HFFormatError(f"{self.root}: tensor {name!r}: the files cover {covered} of the {out.size} "
                                f"elements of {want}; a part of the checkpoint is missing")
        return out


def _whole(root: Path, files: dict[str, tuple[SafetensorsFile, list[str]]]) -> TensorSource:
    """A source over files that hold whole tensors (HF's layout), already opened."""
    pieces, full = {}, {}
    for fname, (f, names) in files.items():
        for n in names:
            pieces[n] = [(fname, n, tuple((0, k) for k in f.shape(n)))]
            full[n] = f.shape(n)
    src = TensorSource(root, pieces, full)
    src._open.update({fname: f for fname, (f, _) in files.items()})
    return src


def open_hf_tensors(path, part: str = "model") -> TensorSource:
    """The weights of an HF directory, or `part` ("model" or "optimizer") of a distributed checkpoint
    of ours (its manifest lists every file's slices)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is not None and "tensors" in manifest:
        pieces, full = {}, {}
        for fname, entries in manifest["tensors"].get(part, {}).items():
            for name, e in entries.items():
                pieces.setdefault(name, []).append((fname, name, tuple(tuple(r) for r in e["region"])))
                full[name] = tuple(e["full"])
        if not full and part == "model":
            raise HFFormatError(f"{path / MANIFEST}: lists no model tensors")
        return TensorSource(path, pieces, full, manifest)
    if part != "model":
        raise HFFormatError(f"{path}: not a checkpoint of ours (no tensors in a {MANIFEST}); it has no {part} state")

    def opened(p: Path) -> SafetensorsFile:
        if manifest is not None:   # a directory of whole tensors with a manifest: check each file first
            check_file(p, manifest["files"].get(p.name))
        return SafetensorsFile(p)
    index_path = path / INDEX_NAME
    if index_path.is_file():
        files = {}
        for shard, names in _read_index(index_path).items():
            shard_path = path / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"{shard_path}: shard listed in {index_path.name} not found")
            f = opened(shard_path)
            missing = [n for n in names if n not in f.header]
            if missing:
                raise HFFormatError(
                    f"{shard_path}: {index_path.name} lists {len(missing)} tensor(s) this shard lacks, "
                    f"e.g. {missing[0]!r}")
            files[shard] = (f, names)
        return _whole(path, files)
    single = path / SINGLE_NAME
    if single.is_file():
        f = opened(single)
        return _whole(path, {SINGLE_NAME: (f, f.names())})
    raise FileNotFoundError(f"{path}: no {SINGLE_NAME} and no {INDEX_NAME}; nothing to load weights from")


def read_hf_dir(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, {tensor name: float32 array}) of a Hugging Face model directory."""
    config = read_hf_config(path)
    src = open_hf_tensors(path)
    return config, {n: src.read(n) for n in src}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path) -> dict | None:
    """manifest.json of a checkpoint of ours (None when the directory has none), its shape checked."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
        if not isinstance(manifest["files"], dict):
            raise TypeError("files must be an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise HFFormatError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e})") from None
    return manifest


def check_file(p: Path, info: dict | None) -> None:
    """A file against its manifest entry: listed, present, its size, its sha256."""
    if info is None:
        raise HFFormatError(f"{p}: not listed in {p.parent / MANIFEST}; the checkpoint is not one whole save")
    if not p.is_file():
        raise HFFormatError(f"{p}: listed in the manifest but missing")
    size = p.stat().st_size
    if size != info["bytes"]:
        raise HFFormatError(
            f"{p}: {size} bytes, the manifest says {info['bytes']}: the file is truncated or was replaced")
    if sha256_file(p) != info["sha256"]:
        raise HFFormatError(f"{p}: sha256 differs from the manifest: the file is corrupted")


def verify_manifest(path) -> dict | None:
    """When the directory has a manifest.json (a checkpoint of ours), check every file it lists
    (present, its size, its sha256) and return it; None when there is no manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is not None:
        for name, info in manifest["files"].items():
            check_file(path / name, info)
    return manifest


def fsync_path(p: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def write_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the permissions of any other file we write: it writes through a
    private temporary file (0600), so weights were unreadable to the group where configs were not."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, _FILE_MODE)


def write_hf_dir(path, config_dict: dict, tensors: dict[str, np.ndarray], max_shard_bytes: int | None = None) -> list[Path]:
    """Write config.json + model.safetensors (or shards + index when they exceed max_shard_bytes).

    Tensors are stored as float32 in the given order; earlier weight files of ours in the
    directory are removed first so a reader never mixes two saves. Returns the files written
    (each fsynced).
    """

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.iterdir():
        if old.name in (SINGLE_NAME, INDEX_NAME) or _SHARD_RE.match(old.name):
            old.unlink()
    arrays = {n: np.ascontiguousarray(t, dtype=np.float32) for n, t in tensors.items()}

    shards: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for name, arr in arrays.items():
        if max_shard_bytes is not None and shards[-1] and used + arr.nbytes > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = arr
        used += arr.nbytes

    written = []
    config_path = path / CONFIG_NAME
    config_path.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    written.append(config_path)
    if len(shards) == 1:
        write_safetensors(shards[0], path / SINGLE_NAME, metadata={"format": "pt"})
        written.append(path / SINGLE_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, path / fname, metadata={"format": "pt"})
            written.append(path / fname)
            weight_map.update({n: fname for n in shard})
        index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())}, "weight_map": weight_map}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        written.append(path / INDEX_NAME)
    for p in written:
        fsync_path(p)
    return written
