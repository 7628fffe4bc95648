"""`cke-dist compare` as a user runs it: a subprocess, its table and its exit status."""
import subprocess
import sys

import numpy as np
import pytest
from mpirun import threads_env


def compare(*args, timeout=120):
    env = threads_env()
    return subprocess.run([sys.executable, "-m", "cke_dist.cli", "compare", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_default_random_model_passes():
    r = compare("--steps", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    for row in ("logits", "loss", "grads", "params after 3 AdamW"):
        assert row in r.stdout
    assert "all within tolerance" in r.stdout


def test_fails_when_tolerance_is_zero():
    r = compare("--steps", "1", "--rtol", "0", "--atol", "0")
    assert r.returncode == 1
    assert "beyond tolerance" in r.stderr
    for row in ("logits", "loss", "grads", "params after 1 AdamW"):
        assert any(line.strip().startswith(row) and "FAIL" in line for line in r.stdout.splitlines()), row


def test_tolerance_scales_with_each_tensor_and_still_fails_a_wrong_one():
    """A real 30-layer model's logits differ from torch's by ~1.4e-4 on values of ~7, some of them near
    zero: within tolerance. A model off by 1% of the scale (a wrong weight) is not."""
    from cke_dist.cli.compare import _diff
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 64, 512)) * 7.0
    close = ref + rng.standard_normal(ref.shape) * 1.4e-4
    assert _diff(close, ref, rtol=1e-4, atol=1e-5)[2] < 1.0
    wrong = ref.copy()
    wrong[0, 0, :8] += 0.07          # 1% of the scale, in 8 of 131,072 logits
    assert _diff(wrong, ref, rtol=1e-4, atol=1e-5)[2] > 10.0


def test_transformers_checkpoint_dir(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    r = compare("--model", str(tmp_path), "--steps", "2", "--seq", "16")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "qwen2" in r.stdout and "all within tolerance" in r.stdout


def test_bad_model_dir_is_a_clear_error(tmp_path):
    r = compare("--model", str(tmp_path / "nope"))
    assert r.returncode != 0
    assert "nope" in r.stderr and "not found" in r.stderr


def test_tensor_parallel_compare_under_mpiexec():
    """mpiexec -n 2 cke-dist compare --tp 2: the sharded model against transformers, gathered."""
    from mpirun import run_mpi
    r = run_mpi(2, ["-m", "cke_dist.cli", "compare", "--tp", "2", "--steps", "3"], timeout=180)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "tensor parallel over 2 ranks" in r.stdout and "all within tolerance" in r.stdout
    assert r.stdout.count("all within tolerance") == 1   # rank 0 prints
    bad = run_mpi(2, ["-m", "cke_dist.cli", "compare", "--tp", "3"], timeout=60)
    assert bad.returncode == 2 and "--tp 3 needs exactly 3 ranks (mpiexec -n 3); this job has 2" in bad.stdout
