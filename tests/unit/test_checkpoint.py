"""Checkpoints: atomic layout, manifest verification, round trip, pruning, bad input."""
import json

import numpy as np
import pytest

from cke_dist.formats.checkpoint import (
    CheckpointError,
    Shard,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from cke_dist.formats.hf import HFFormatError
from cke_dist.model import LlamaConfig, Model, load_model
from cke_dist.train.optim import AdamW

CFG = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def _trained(steps=2):
    model = Model.from_config(LlamaConfig.from_dict(CFG), seed=1)
    opt = AdamW(model, lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        x = rng.integers(0, 256, (2, 16))
        model.zero_grad()
        model.forward_backward(x, np.roll(x, -1, axis=1))
        opt.step()
    return model, opt


def _write(root, step, model, opt, state, tokenizer, keep=None):
    shard = Shard(0, 1, model.specs, model.params, opt.state_dict())
    return save_checkpoint(root, step, model.config, shard, dict(state, optimizer={"step": opt.step_count}),
                           tokenizer, keep=keep)


def _read_all(path):
    """What --resume reads: the trainer state, every weight and every optimizer moment."""
    ck = load_checkpoint(path)
    model = load_model(ck.path)
    return ck, model, ck.optimizer_state(model.specs, ("exp_avg", "exp_avg_sq"))


def _save(root, step=5, keep=None, model_opt=None):
    model, opt = model_opt or _trained()
    return _write(root, step, model, opt, {"config": {"k": 1}}, {"cke_tokenizer.json": b'{"type": "bytes"}\n'}, keep=keep), model, opt


def test_round_trip(tmp_path):
    path, model, opt = _save(tmp_path / "ckpts")
    assert path.name == "step_00000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "cke_tokenizer.json", "config.json", "manifest.json", "model.safetensors", "optimizer.safetensors",
        "trainer_state.json"]
    assert not [p for p in (tmp_path / "ckpts").iterdir() if p.name.startswith(".")]  # no temp dir left
    manifest = verify_checkpoint(path)
    assert set(manifest["files"]) == {"cke_tokenizer.json", "config.json", "model.safetensors",
                                      "optimizer.safetensors", "trainer_state.json"}
    ck, again, loaded = _read_all(tmp_path / "ckpts")  # a checkpoints root finds its newest step
    assert ck.path == path and ck.trainer_state == {"config": {"k": 1}, "optimizer": {"step": 2}, "step": 5}
    state = opt.state_dict()
    assert loaded.keys() == state.keys()
    assert loaded["step"] == state["step"] == 2 and isinstance(loaded["step"], int)
    for k in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(loaded[k], state[k])
    np.testing.assert_array_equal(again.params, model.params)
    assert json.loads((path / "cke_tokenizer.json").read_text()) == {"type": "bytes"}


def test_run_dir_and_pruning(tmp_path):
    run = tmp_path / "run"
    mo = _trained(1)
    for step in (1, 2, 3, 4):
        _write(run / "checkpoints", step, *mo, {"config": {}}, None, keep=2)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000003", "step_00000004"]
    assert find_checkpoint(run).name == "step_00000004"
    assert not (run / "checkpoints" / "step_00000004" / "cke_tokenizer.json").exists()
    # the same step written twice replaces the old one whole
    _write(run / "checkpoints", 4, *mo, {"config": {"again": True}}, None)
    assert load_checkpoint(run).trainer_state["config"] == {"again": True}


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors", "trainer_state.json"])
def test_corrupted_or_truncated_file_is_named(tmp_path, victim):
    path, _, _ = _save(tmp_path)
    f = path / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises((CheckpointError, HFFormatError), match=rf"{victim}: sha256 differs.*corrupted"):
        _read_all(path)
    f.write_bytes(bytes(data[:-3]))
    with pytest.raises((CheckpointError, HFFormatError),
                       match=rf"{victim}: \d+ bytes, the manifest says \d+.*truncated"):
        _read_all(path)
    f.unlink()
    with pytest.raises((CheckpointError, HFFormatError), match=rf"{victim}: listed in the manifest but missing"):
        _read_all(path)


def test_incomplete_or_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_checkpoint(tmp_path)
    path, _, _ = _save(tmp_path)
    (path / "manifest.json").unlink()  # what a crash before the manifest would look like
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        load_checkpoint(path)
    (path / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="manifest.json: unreadable"):
        load_checkpoint(path)


def test_every_loader_of_a_checkpoint_verifies_its_manifest(tmp_path):
    """One flipped byte in model.safetensors: --resume refused it, but load_model and generate's
    loader (InferenceModel.from_dir, now load_inference_model) loaded it silently; now each names the file."""
    from cke_dist.model import load_model
    from cke_dist.model.load import load_inference_model
    path, model, _ = _save(tmp_path / "ckpts")
    np.testing.assert_array_equal(load_model(path).params, model.params)   # intact: loads
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x10                     # inside the last tensor's data: the header still parses
    f.write_bytes(bytes(raw))
    for load in (load_model, load_inference_model):
        with pytest.raises(HFFormatError, match="model.safetensors: sha256 differs from the manifest"):
            load(path)
    with pytest.raises(CheckpointError, match="sha256 differs"):
        verify_checkpoint(path)


def test_leftovers_of_a_crashed_save_are_removed_at_the_next(tmp_path):
    """Only ours by name, and only those of dead processes (a save running beside us keeps its own)."""
    import os
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    root = tmp_path / "ckpts"
    crashed = root / f".tmp-step_00000003-{dead}"
    running = root / f".tmp-step_00000004-{os.getppid()}"
    other = root / ".tmp-notes"
    for d in (crashed, running, other):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
    _save(root, step=5)
    assert not crashed.exists() and running.exists() and other.exists()
    assert [p.name for p in list_checkpoints(root)] == ["step_00000005"]
