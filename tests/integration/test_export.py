"""`cke-dist export`: a checkpoint of the train job as a plain Hugging Face directory that transformers loads."""
import json
import subprocess
import sys

import numpy as np
from jobs import run_job
from mpirun import REPO


def test_export_of_a_tp_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path, corpus):
    import torch
    from transformers import AutoModelForCausalLM

    from cke_dist.model import load_model

    res = run_job(tmp_path, "run", 2, "train.steps=3", "parallel.tp=2")
    assert res.returncode == 0, res.stdout[-2000:]
    out = tmp_path / "hf"
    ex = subprocess.run([sys.executable, "-m", "cke_dist.cli", "export", str(tmp_path / "run"), str(out),
                         "--max-shard-mb", "0.1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ex.returncode == 0, ex.stderr
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "cke_tokenizer.json" in files
    shards = [f for f in files if f.startswith("model-0")]
    assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert not {"optimizer.safetensors", "trainer_state.json", "manifest.json"} & set(files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    ours = load_model(out)
    assert set(index["weight_map"]) == set(ours.named_params)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    x = np.random.default_rng(0).integers(0, 256, (2, 12))
    with torch.no_grad():
        ref = hf(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(ours.forward(x), ref, rtol=1e-4, atol=1e-4)
    again = subprocess.run([sys.executable, "-m", "cke_dist.cli", "export", str(tmp_path / "run"), str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
