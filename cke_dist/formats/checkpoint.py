"""Training checkpoints: every rank writes what it holds; any layout loads them.

A checkpoint is `<run>/checkpoints/step_<8 digits>/` holding
  config.json                      the model's HF config
  model.safetensors                the weights under their HF names: one file per writing rank
    or model-0000k-of-0000n.*      (n = pp x tp writers, dp replica 0's ranks), each holding the
                                   slices its rank owns (a KV head or norm shared by tp ranks is
                                   written once, by the rank that owns it)
    or adapter_model*.safetensors  a LoRA run's adapters only (PEFT's names), with adapter_config.json
                                   naming the base model (cke_dist.model.lora): one process writes
                                   an adapter directory `peft` loads as it is
  optimizer.safetensors            the optimizer's per-parameter state as "<state>/<HF name>" tensors,
    or optimizer-0000k-of-0000n.*  the same slices as the weights
  tokenizer files                  the model's tokenizer as it came (tokenizer.json, tokenizer_config.json,
                                   chat_template.jinja, ...; formats.tokenizer.tokenizer_files), or
                                   cke_tokenizer.json = {"type": "bytes"} when the ids are bytes
  trainer_state.json               step, the training config, data position (seed + step), the
                                   optimizer's scalars, the grid that wrote it
  manifest.json                    sha256 and size of every file, and the region of the full tensor
                                   each stored tensor is, per file
A one-process (or tp = 1) checkpoint stores whole tensors, so `transformers` loads it as it is
(`model.safetensors`, or shards plus `model.safetensors.index.json`); `cke-dist export` turns any
checkpoint into a plain HF directory.

Rules this module keeps:
- Written into one hidden temporary directory beside the final one (rank 0 makes it and names it):
  each writer writes and fsyncs its files and a part list, every rank waits in a barrier with the
  checkpoint's own deadline (a slow write is not a comm timeout), rank 0 checks that the parts
  tile every tensor exactly once, writes the manifest and renames the directory into place; a
  reader never sees half a checkpoint, and a crash leaves only a `.tmp-*` directory that the next
  save removes.
- Loading reads only the slices the loading rank needs (cke_dist.formats.hf.TensorSource) and
  verifies every file it reads against the manifest first, failing with the file named (missing,
  truncated, corrupted); it never falls back to an older checkpoint silently.
- Only the newest `keep` step directories are kept.
Tests: tests/unit/test_checkpoint.py, resume in tests/integration/test_train_job.py, across layouts in
tests/integration/test_reshard.py.
"""
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cke_dist.comm.shm import pid_alive
from cke_dist.formats.hf import (CONFIG_NAME, INDEX_NAME, MANIFEST, HFFormatError, check_file, fsync_path,
                                 open_hf_tensors, read_manifest, sha256_file, verify_manifest, write_safetensors)

TRAINER_STATE = "trainer_state.json"
FORMAT = "cke-dist checkpoint 2"
_STEP_PREFIX = "step_"
_PART = re.compile(r"^\.part-(\d+)\.json$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match its manifest."""


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def file_names(k: int, n: int, stem: str = "model") -> tuple[str, str]:
    """(weights, optimizer) file names of writer k of n; stem "adapter_model" for LoRA adapters."""
    if n == 1:
        return f"{stem}.safetensors", "optimizer.safetensors"
    return f"{stem}-{k + 1:05d}-of-{n:05d}.safetensors", f"optimizer-{k + 1:05d}-of-{n:05d}.safetensors"


def owned_region(spec):
    """[(start, stop) per dim] of the full tensor that this rank owns of `spec`, and the local index
    of that part, or None when it owns none of it (a replica another rank writes)."""
    lo, hi = spec.owned
    if hi <= lo:
        return None
    if spec.dim is None:
        return tuple((0, n) for n in spec.full), ()
    region = [(0, n) for n in spec.full]
    region[spec.dim] = (spec.start + lo, spec.start + hi)
    return tuple(region), (slice(None),) * spec.dim + (slice(lo, hi),)


@dataclass
class Shard:
    """What one writing rank saves: the owned parts of its tensors and of its optimizer's state.

    specs: the rank's ParamSpecs (flat-buffer order); params: its flat parameters; optimizer: the
    optimizer's state_dict, its arrays flat in the same layout (ZeRO: gathered over dp first)."""
    index: int
    count: int
    specs: list
    params: np.ndarray
    optimizer: dict = field(default_factory=dict)
    stem: str = "model"          # "adapter_model": a LoRA run's adapters (PEFT's file name)

    def tensors(self, flat: np.ndarray):
        """(name, region, contiguous owned part) of each tensor of a flat buffer in this layout."""
        n = 0
        for spec in self.specs:
            local = flat[n:n + spec.size].reshape(spec.shape)
            n += spec.size
            owned = owned_region(spec)
            if owned is not None:
                yield spec.name, spec.full, owned[0], np.ascontiguousarray(local[owned[1]])


def _write_shard(tmp: Path, shard: Shard) -> None:
    """Write one rank's weights and optimizer files, fsynced, and its part list (.part-k.json)."""
    model_name, optim_name = file_names(shard.index, shard.count, shard.stem)
    part = {"index": shard.index, "count": shard.count, "files": {}, "tensors": {"model": {}, "optimizer": {}}}
    arrays = {"model": {}, "optimizer": {}}
    for name, full, region, data in shard.tensors(shard.params):
        arrays["model"][name] = data
        part["tensors"]["model"][name] = {"full": list(full), "region": [list(r) for r in region]}
    for key, flat in shard.optimizer.items():
        if isinstance(flat, np.ndarray) and flat.shape == shard.params.shape:
            for name, full, region, data in shard.tensors(flat):
                arrays["optimizer"][f"{key}/{name}"] = data
                part["tensors"]["optimizer"][f"{key}/{name}"] = {"full": list(full),
                                                                 "region": [list(r) for r in region]}
    for what, fname in (("model", model_name), ("optimizer", optim_name)):
        if what == "optimizer" and not arrays[what]:
            part["tensors"].pop(what)   # an optimizer with no per-parameter state (SGD without momentum)
            continue
        write_safetensors(arrays[what], tmp / fname, metadata={"format": "pt"})
        fsync_path(tmp / fname)
        part["files"][fname] = {"sha256": sha256_file(tmp / fname), "bytes": (tmp / fname).stat().st_size}
        part["tensors"][what] = {fname: part["tensors"][what]}
    _write_json(tmp / f".part-{shard.index}.json", part)
    fsync_path(tmp / f".part-{shard.index}.json")


def _check_tiling(tmp: Path, tensors: dict) -> None:
    """Every tensor of a part ("model", "optimizer") covered by its pieces exactly once."""
    pieces: dict[str, list] = {}
    full: dict[str, tuple] = {}
    for entries in tensors.values():
        for name, e in entries.items():
            pieces.setdefault(name, []).append(tuple(map(tuple, e["region"])))
            full[name] = tuple(e["full"])
    for name, regions in pieces.items():
        size = sum(int(np.prod([b - a for a, b in r], dtype=np.int64)) for r in regions)
        overlap = any(all(max(a0, b0) < min(a1, b1) for (a0, a1), (b0, b1) in zip(r, q))
                      for i, r in enumerate(regions) for q in regions[i + 1:])
        if overlap or size != int(np.prod(full[name], dtype=np.int64)):
            raise CheckpointError(f"{tmp}: the ranks' slices of {name} do not tile its shape {list(full[name])} "
                                  f"({list(regions)}); not saving an incomplete checkpoint")


def _finish(tmp: Path, step: int, config, trainer_state: dict, tokenizer: dict[str, bytes]) -> None:
    """Rank 0, once every writer is done: merge the parts, write the small files and the manifest."""
    parts = [json.loads(p.read_text()) for p in sorted(tmp.iterdir()) if _PART.match(p.name)]
    count = parts[0]["count"] if parts else 0
    if sorted(p["index"] for p in parts) != list(range(count)) or not count:
        raise CheckpointError(f"{tmp}: parts {sorted(p['index'] for p in parts)} of {count} writers arrived; "
                              f"not saving an incomplete checkpoint")
    files, tensors = {}, {"model": {}, "optimizer": {}}
    for p in parts:
        files.update(p["files"])
        for what, by_file in p["tensors"].items():
            tensors[what].update(by_file)
    for what in tensors:
        _check_tiling(tmp, tensors[what])
    if not tensors["optimizer"]:
        del tensors["optimizer"]

    _write_json(tmp / CONFIG_NAME, config.to_dict())
    for name, data in tokenizer.items():
        (tmp / name).write_bytes(data)
    _write_json(tmp / TRAINER_STATE, dict(trainer_state, step=step))
    if count > 1 and all(f.startswith("model") for f in tensors["model"]) and all(e["region"] == [[0, n] for n in e["full"]]
                         for entries in tensors["model"].values() for e in entries.values()):
        # whole tensors in several files (pp, tp = 1): an HF index makes the checkpoint a model directory too
        weight_map = {name: fname for fname, entries in tensors["model"].items() for name in entries}
        _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": sum(files[f]["bytes"] for f in tensors["model"])},
                                       "weight_map": weight_map})
    for name in (CONFIG_NAME, *tokenizer, TRAINER_STATE, INDEX_NAME):
        if (tmp / name).is_file():
            fsync_path(tmp / name)
            files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
    _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": dict(sorted(files.items())),
                                 "tensors": tensors})
    fsync_path(tmp / MANIFEST)
    for p in tmp.iterdir():
        if _PART.match(p.name):
            p.unlink()
    fsync_path(tmp)


_LEFTOVER = re.compile(r"^\.(tmp|old)-step_\d{8}-(\d+)$")


def remove_leftovers(root: Path) -> list[Path]:
    """Remove the `.tmp-step_*-PID` / `.old-step_*-PID` directories a crashed save left in root (ours
    by name, and only those of processes no longer alive, so a save running beside us is kept)."""

    gone = []
    for p in root.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and p.is_dir() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def step_dir_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:08d}"


def save_checkpoint(root, step: int, config, shard: Shard | None, trainer_state: dict,
                    tokenizer: dict[str, bytes] | None = None, keep: int | None = None, world=None,
                    timeout: float | None = None) -> Path:
    """Write `root/step_<step>` atomically and return its path; prune to the newest `keep`.

    Collective over `world` (None: one process): every rank calls it; the writers (dp replica 0's
    ranks) pass their Shard, the others None. config: the model's LlamaConfig; trainer_state: what
    resume needs besides tensors (rank 0's is written); tokenizer: {file name: content} written
    beside the weights (formats.tokenizer.tokenizer_files). The barriers wait up to `timeout` seconds
    (the checkpoint's own deadline, not the comm one)."""
    root = Path(root)
    rank = world.rank if world is not None else 0
    final = root / step_dir_name(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    pid = np.array([os.getpid()], np.int64)
    if world is not None and world.size > 1:
        world.broadcast(pid, root=0)   # every rank writes into rank 0's temp dir (made before this returns)
    tmp = root / f".tmp-{final.name}-{int(pid[0])}"
    if shard is not None:
        _write_shard(tmp, shard)
    if world is not None and world.size > 1:
        world.barrier(timeout=timeout)
    if rank == 0:
        _finish(tmp, step, config, trainer_state, tokenizer or {})
        if final.exists():  # the same step written again (a rerun): swap, never leave a gap without one
            old = root / f".old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        fsync_path(root)
        if keep is not None:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old)
    if world is not None and world.size > 1:
        world.barrier(timeout=timeout)   # nobody goes on (or reads it) before it is in place
    return final


def list_checkpoints(root) -> list[Path]:
    """Complete step directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX)
                  and p.name[len(_STEP_PREFIX):].isdigit())


def find_checkpoint(path) -> Path:
    """A checkpoint directory itself, or the newest one of a run directory (or its checkpoints/)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint or run directory not found")
    if (path / MANIFEST).exists() or (path / TRAINER_STATE).exists():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointError(
        f"{path}: neither a checkpoint (no {MANIFEST}) nor a run directory with checkpoints/step_* in it")


def model_path(path) -> Path:
    """What a model argument names: a run directory (one with checkpoints/step_*) means its newest
    checkpoint; anything else (a model or checkpoint directory, a GGUF file) is itself."""
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_NAME).exists() and (list_checkpoints(path / "checkpoints")
                                                                 or list_checkpoints(path)):
        return find_checkpoint(path)
    return path


def verify_checkpoint(ckpt) -> dict:
    """Check every file against the manifest; returns the manifest."""
    ckpt = Path(ckpt)
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing; {ckpt} is not a complete checkpoint")
    try:
        manifest = verify_manifest(ckpt)
    except HFFormatError as e:
        raise CheckpointError(str(e)) from None
    _check_training(ckpt, manifest)
    return manifest


def _check_training(ckpt: Path, manifest: dict) -> None:
    if manifest.get("format") != FORMAT or "tensors" not in manifest:
        raise CheckpointError(f"{ckpt / MANIFEST}: format {manifest.get('format')!r}, this cke-dist reads "
                              f"{FORMAT!r}; load its weights with load_model or `cke-dist export`, or train anew")
    for need in (TRAINER_STATE, CONFIG_NAME):
        if need not in manifest["files"]:
            raise CheckpointError(f"{ckpt / MANIFEST}: lists no {need}; not a training checkpoint")


@dataclass
class Checkpoint:
    path: Path
    trainer_state: dict

    def optimizer_state(self, specs, names) -> dict:
        """The optimizer state for a rank holding `specs` (any layout): each of `names` as a flat
        array in the specs' layout, read slice by slice, plus the saved scalars."""
        state = dict(self.trainer_state.get("optimizer", {}))
        if names:
            try:
                src = open_hf_tensors(self.path, "optimizer")
                for key in names:
                    missing = [s.name for s in specs if f"{key}/{s.name}" not in src]
                    if missing:
                        raise CheckpointError(f"{self.path}: the optimizer state has no {key!r} for {missing[0]} "
                                              f"(it was saved by another optimizer?)")
                    state[key] = np.concatenate([src.read(f"{key}/{s.name}", s.index).reshape(-1) for s in specs])
            except HFFormatError as e:
                raise CheckpointError(str(e)) from None
        return state


def load_checkpoint(path) -> Checkpoint:
    """Find a checkpoint and read its trainer state (the small files verified now; the weight and
    optimizer files as each rank reads its slices: load_model(.path), .optimizer_state)."""
    ckpt = find_checkpoint(path)
    try:
        manifest = read_manifest(ckpt)
        if manifest is None:
            raise CheckpointError(f"{ckpt / MANIFEST}: missing; {ckpt} is not a complete checkpoint")
        _check_training(ckpt, manifest)
        for name in (TRAINER_STATE, CONFIG_NAME):
            check_file(ckpt / name, manifest["files"].get(name))
    except HFFormatError as e:
        raise CheckpointError(str(e)) from None
    return Checkpoint(ckpt, json.loads((ckpt / TRAINER_STATE).read_text()))
