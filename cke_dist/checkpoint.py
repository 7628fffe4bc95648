"""Training checkpoints: a Hugging Face model directory plus what it takes to resume.

A checkpoint is `<run>/checkpoints/step_<8 digits>/` holding
  config.json, model.safetensors (or shards + index)   full tensors (loads in transformers)
  cke_tokenizer.json   {"type": "bytes"} when the ids are bytes
  optimizer.npz        the optimizer's flat state arrays and scalars
  trainer_state.json   step, the training config, data position (seed + step) and world size
  manifest.json        sha256 and size of every other file

Rules this module keeps:
- Written whole into a hidden temporary directory beside the final one, every file and the
  directory fsynced, then renamed into place: a reader never sees half a checkpoint, and a
  crash leaves only a `.tmp-*` directory that nothing reads.
- Loading verifies every file against the manifest first and fails naming the file and what
  is wrong (missing, truncated, corrupted); it never falls back to an older checkpoint silently.
- Only the newest `keep` step directories are kept.
Tests: tests/test_checkpoint.py, resume in tests/test_train_job.py.
"""
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .model.hf_io import MANIFEST, HFFormatError, fsync_path, sha256_file, verify_manifest, write_hf_dir

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.npz"
TOKENIZER = "cke_tokenizer.json"
FORMAT = "cke-dist checkpoint 1"
_STEP_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match its manifest."""


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save_optimizer_state(path: Path, state: dict) -> None:
    arrays = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            arrays[k] = v
        elif isinstance(v, (bool, int, float, np.integer, np.floating)):
            arrays[k] = np.asarray(v)  # 0-d; its dtype tells load whether it was int or float
        else:
            raise TypeError(f"optimizer state {k!r} is a {type(v).__name__}; only arrays and numbers are saved")
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_optimizer_state(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}


_LEFTOVER = re.compile(r"^\.(tmp|old)-step_\d{8}-(\d+)$")


def remove_leftovers(root: Path) -> list[Path]:
    """Remove the `.tmp-step_*-PID` / `.old-step_*-PID` directories a crashed save left in root (ours
    by name, and only those of processes no longer alive, so a save running beside us is kept)."""
    from .comm.shm import pid_alive

    gone = []
    for p in root.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and p.is_dir() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def step_dir_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:08d}"


def save_checkpoint(root, step: int, config, tensors: dict, optimizer_state: dict, trainer_state: dict,
                    tokenizer: dict | None = None, keep: int | None = None) -> Path:
    """Write `root/step_<step>` atomically and return its path; prune to the newest `keep`.

    config: the model's LlamaConfig; tensors: {HF name: full tensor} of the whole model;
    optimizer_state: flat arrays in the one-process layout plus scalars (a distributed job gathers
    both first: cke_dist.train.gather_checkpoint)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_hf_dir(tmp, config.to_dict(), tensors)
    if tokenizer is not None:
        _write_json(tmp / TOKENIZER, tokenizer)
    save_optimizer_state(tmp / OPTIMIZER, optimizer_state)
    _write_json(tmp / TRAINER_STATE, dict(trainer_state, step=step))

    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            fsync_path(p)
            files[p.relative_to(tmp).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": files})
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)

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
    for need in (TRAINER_STATE, OPTIMIZER, "config.json"):
        if need not in manifest["files"]:
            raise CheckpointError(f"{mpath}: lists no {need}; not a training checkpoint")
    return manifest


@dataclass
class Checkpoint:
    path: Path
    trainer_state: dict
    optimizer_state: dict


def load_checkpoint(path) -> Checkpoint:
    """Find, verify and read a checkpoint's trainer and optimizer state (load the model with load_model(.path))."""
    ckpt = find_checkpoint(path)
    verify_checkpoint(ckpt)
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    return Checkpoint(ckpt, state, load_optimizer_state(ckpt / OPTIMIZER))
