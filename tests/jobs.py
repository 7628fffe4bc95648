"""The tiny train job the parallel-layout tests run under mpiexec, and what they read back from it."""
import json
import os
import subprocess
import sys

from mpirun import REPO

TINY = ["model.hidden_size=48", "model.intermediate_size=70", "model.num_hidden_layers=2",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.max_position_embeddings=32",
        "model.vocab_size=256", "data.seq_len=16", "data.batch_size=4", "data.grad_accum=2",
        "sample.max_new_tokens=0", "train.eval_every=0", "train.eval_batches=2", "train.log_every=1",
        "optim.warmup_steps=0", "optim.lr=3e-3", "optim.min_lr=3e-3", "train.checkpoint_every=3"]


def run_job(tmp_path, name, n, *sets, resume=None):
    from mpirun import run_mpi
    args = ["-m", "cke_dist.cli", "train", "--no-progress"]
    for s in [*TINY, f"data.path={tmp_path / 'corpus.txt'}", f"train.out_dir={tmp_path / name}", *sets]:
        args += ["--set", s]
    args += ["--resume", str(resume)] if resume else []
    if n == 1:
        res = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
                                      OPENBLAS_NUM_THREADS="1"))
        res.stdout += res.stderr
        return res
    return run_mpi(n, args, timeout=120, env={"CKE_COMM_TIMEOUT": "20"})


def logged_losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def checkpoint_params(out, step):
    from cke_dist.model import load_model
    return load_model(out / "checkpoints" / f"step_{step:08d}").params
