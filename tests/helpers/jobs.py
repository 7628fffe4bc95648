"""The tiny train job the parallel-layout tests run under mpiexec, what they read back from it, and the job
control the tests that kill a rank share (a job tagged in its environment, the pid of one of its ranks)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from mpirun import REPO, THREAD_VARS, threads_env

TINY = ["model.hidden_size=48", "model.intermediate_size=70", "model.num_hidden_layers=2",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.max_position_embeddings=32",
        "model.vocab_size=256", "data.seq_len=16", "data.batch_size=4", "data.grad_accum=2",
        "sample.max_new_tokens=0", "train.eval_every=0", "train.eval_tokens=128", "train.log_every=1",
        "optim.warmup_steps=0", "optim.lr=3e-3", "optim.min_lr=3e-3", "train.checkpoint_every=3"]


def run_job(tmp_path, name, n, *sets, resume=None):
    from mpirun import run_mpi
    args = ["-m", "cke_dist.cli", "train", "--no-progress"]
    for s in [*TINY, f"data.path={tmp_path / 'corpus.txt'}", f"train.out_dir={tmp_path / name}", *sets]:
        args += ["--set", s]
    args += ["--resume", str(resume)] if resume else []
    if n == 1:
        res = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env=threads_env())
        res.stdout += res.stderr
        return res
    return run_mpi(n, args, timeout=120, env={"CKE_COMM_TIMEOUT": "20"})


def logged_losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def checkpoint_params(out, step):
    from cke_dist.model import load_model
    return load_model(out / "checkpoints" / f"step_{step:08d}").params


def job_env(tag=""):
    env = dict(os.environ, CKE_COMM_TIMEOUT="20", CKE_TEST_TAG=tag)
    env.update({v: "1" for v in THREAD_VARS})
    return env


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def rank_pid(tag: str, rank: int) -> int | None:
    """The pid of MPI rank `rank` of the job whose environment carries `tag`."""
    want = (f"CKE_TEST_TAG={tag}".encode(), f"PMI_RANK={rank}".encode())
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                env = (d / "environ").read_bytes().split(b"\0")
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(w in env for w in want) and argv[1:3] == [b"-m", b"cke_dist.cli"]:  # python, not its sh
                return int(d.name)
    return None
