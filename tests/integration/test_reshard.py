"""Distributed checkpoints: saved by every rank of one layout, resumed on any other.

The proof shape for every layout: the same job in one process and in the layout (same seed, same
batches); here the layout changes halfway. 4 steps on dp=2 x tp=2, then 4 more on pp=2, on
tp=2 x pp=2, on dp=4 and in one process: each equals 8 steps in one process within float32
tolerance, the AdamW moments included.
"""
import json

import numpy as np
import pytest
from jobs import run_job

from cke_dist.formats.checkpoint import load_checkpoint
from cke_dist.model import load_model

STEPS = ["train.steps=8", "train.checkpoint_every=4", "data.grad_accum=4", "data.batch_size=4"]


def params_and_moments(ckpt):
    """The one-process view of a checkpoint of any layout: flat params and AdamW moments."""
    ck = load_checkpoint(ckpt)
    model = load_model(ck.path)
    state = ck.optimizer_state(model.specs, ("exp_avg", "exp_avg_sq"))
    return model.params, state


def close(got, ref, what):
    diff = np.abs(got - ref)
    scale = np.abs(ref).max()
    assert diff.max() < 2e-4 * max(scale, 1.0) and np.median(diff) < 1e-6 * max(scale, 1.0), \
        (what, diff.max(), np.median(diff), scale)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    text = np.random.default_rng(0).choice(list(b"abcdefgh ijklmnop\n"), 20_000).astype(np.uint8)
    (tmp / "corpus.txt").write_bytes(text.tobytes())
    one = run_job(tmp, "one", 1, *STEPS)
    assert one.returncode == 0, one.stdout[-3000:]
    first = run_job(tmp, "dp2tp2", 4, *STEPS[1:], "train.steps=4", "parallel.tp=2")
    assert first.returncode == 0, first.stdout[-3000:]
    return tmp


def test_every_rank_writes_its_slices_once(runs):
    ckpt = runs / "dp2tp2" / "checkpoints" / "step_00000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    # dp replica 0's two tp ranks wrote one file each (weights and moments); the dp=1 replica none
    assert sorted(manifest["tensors"]["model"]) == ["model-00001-of-00002.safetensors",
                                                    "model-00002-of-00002.safetensors"]
    assert sorted(manifest["tensors"]["optimizer"]) == ["optimizer-00001-of-00002.safetensors",
                                                        "optimizer-00002-of-00002.safetensors"]
    a, b = (manifest["tensors"]["model"][f"model-0000{k}-of-00002.safetensors"] for k in (1, 2))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert a[q]["region"] == [[0, 24], [0, 48]] and b[q]["region"] == [[24, 48], [0, 48]]   # row halves
    norm = "model.layers.0.input_layernorm.weight"
    assert norm in a and norm not in b                   # a replicated tensor is written once, by its owner
    sizes = [(ckpt / f).stat().st_size for f in sorted(manifest["tensors"]["model"])]
    assert max(sizes) < 0.6 * sum(sizes), sizes          # neither rank wrote the whole model
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["grid"] == {"dp": 2, "pp": 1, "tp": 2} and state["optimizer"] == {"step": 4}
    assert not list(ckpt.glob(".part-*"))


def test_resuming_on_a_world_the_saved_layout_does_not_fit_says_how_to_change_it(runs):
    res = run_job(runs, "bad", 3, *STEPS, resume=runs / "dp2tp2" / "checkpoints" / "step_00000004")
    assert res.returncode == 2
    assert "keeps the checkpoint's [parallel] section unless --set parallel.tp=T" in res.stdout, res.stdout[-2000:]


LAYOUTS = {"pp2": (2, ["parallel.tp=1", "parallel.pp=2"]), "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
           "dp4": (4, ["parallel.tp=1"]), "one_process": (1, ["parallel.tp=1"])}
_resumed = {}


def resume_on(runs, name):
    """The dp2tp2 checkpoint resumed on layout `name` for 4 more steps (run once per module, by whichever
    test asks first)."""
    if (runs, name) not in _resumed:
        n, sets = LAYOUTS[name]
        _resumed[runs, name] = run_job(runs, name, n, *STEPS, *sets,
                                       resume=runs / "dp2tp2" / "checkpoints" / "step_00000004")
    return _resumed[runs, name]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resume_on_another_layout_continues_the_same_run(runs, name):
    res = resume_on(runs, name)
    assert res.returncode == 0, res.stdout[-3000:]
    got_p, got_s = params_and_moments(runs / name / "checkpoints" / "step_00000008")
    ref_p, ref_s = params_and_moments(runs / "one" / "checkpoints" / "step_00000008")
    close(got_p, ref_p, "params")
    for k in ("exp_avg", "exp_avg_sq"):
        close(got_s[k], ref_s[k], k)
    assert got_s["step"] == ref_s["step"] == 8
    assert np.abs(got_p - params_and_moments(runs / "dp2tp2" / "checkpoints" / "step_00000004")[0]).max() > 1e-3


def test_a_pipeline_checkpoint_is_a_model_directory_transformers_loads(runs):
    """tp = 1: every tensor is whole in one stage's file, so the checkpoint carries an HF index."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    res = resume_on(runs, "pp2")
    assert res.returncode == 0, res.stdout[-3000:]
    ckpt = runs / "pp2" / "checkpoints" / "step_00000008"
    assert (ckpt / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    ours = load_model(ckpt)
    for name, t in hf.state_dict().items():
        if name in ours.named_params:
            np.testing.assert_array_equal(t.numpy(), ours.named_params[name], err_msg=name)
