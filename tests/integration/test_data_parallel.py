"""Data parallelism: the multi-rank suite (tests/ranks/data_parallel_mpi.py at 2 and 4 ranks), bucket rules in one
process, and the real train job under mpiexec with one rank killed mid-run, then resumed."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import jobs
from jobs import job_env, kill_group, rank_pid
from mpirun import RANKS, REPO, mpiexec, run_mpi, run_pytest_mpi


@pytest.mark.parametrize("n", [2, 4])
def test_dp_suite(n):
    res = run_pytest_mpi(n, RANKS / "data_parallel_mpi.py", timeout=150)
    assert "passed" in res.stdout and "failed" not in res.stdout


# ---- one process ------------------------------------------------------------------------------

def test_cut_buckets_cover_the_buffer_back_to_front():
    from cke_dist.parallel.data_parallel import cut_buckets

    assert cut_buckets(10, 4) == [(6, 10), (2, 6), (0, 2)]
    assert cut_buckets(8, 4) == [(4, 8), (0, 4)]
    assert cut_buckets(0, 4) == []
    with pytest.raises(ValueError, match="at least one element"):
        cut_buckets(10, 0)


def test_bad_bucket_arguments_are_named():
    from cke_dist.parallel import GradBuckets

    with pytest.raises(ValueError, match="flat, contiguous"):
        GradBuckets(np.zeros((4, 4), np.float32), None)
    with pytest.raises(ValueError, match="bucket_mb=0"):
        GradBuckets(np.zeros(16, np.float32), None, bucket_mb=0)


def test_train_step_on_one_process_is_the_plain_step():
    """A size-1 world: train_step with K micro-batches equals zero_grad + K x (1/K) + clip + step, bitwise."""
    from cke_dist.comm import init
    from cke_dist.model import LlamaConfig, Model
    from cke_dist.parallel import GradBuckets, ProcessGrid, sync_params, train_step
    from cke_dist.parallel.step import clip_grad_norm
    from cke_dist.train.optim import AdamW

    cfg = LlamaConfig.from_dict(dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    grid = ProcessGrid(init())
    assert grid.dp == 1
    rng = np.random.default_rng(0)
    mbs = [(rng.integers(0, 50, (2, 8)), rng.integers(0, 50, (2, 8))) for _ in range(3)]
    a, b = Model.from_config(cfg, seed=1), Model.from_config(cfg, seed=1)
    sync_params(a, grid)
    oa, ob = AdamW(a, lr=1e-2), AdamW(b, lr=1e-2)
    buckets = GradBuckets(a.grads, grid.dp_group, bucket_mb=0.01)
    for _ in range(3):
        loss, norm = train_step(a, oa, grid, mbs, 1e-2, 0.5, buckets)
        b.zero_grad()
        ref = sum(b.forward_backward(x, y, grad_scale=1 / 3) for x, y in mbs) / 3
        ref_norm = clip_grad_norm(b.grads, 0.5)
        ob.step(lr=1e-2)
        assert loss == ref and norm == ref_norm
    np.testing.assert_array_equal(a.params, b.params)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        train_step(a, oa, grid, [], 1e-2, 0.5, buckets)


# ---- the train job under mpiexec, one rank killed ----------------------------------------------

# jobs.TINY's lr is constant, so runs told different train.steps follow the same schedule
TINY = [*jobs.TINY, "train.keep_checkpoints=2", "train.checkpoint_every=200"]


def _train_args(out, corpus, *sets, resume=None):
    args = ["-m", "cke_dist.cli", "train", "--no-progress"]
    for s in [*TINY, f"data.path={corpus}", f"train.out_dir={out}", *sets]:
        args += ["--set", s]
    return args + (["--resume", str(resume)] if resume else [])


def _final_params(out):
    from cke_dist.formats.checkpoint import find_checkpoint
    from cke_dist.model import load_model

    ckpt = find_checkpoint(out)
    return int(ckpt.name.split("_")[1]), load_model(ckpt).params


def _val_loss(out):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def _newest_step(out) -> int:
    steps = [int(d.name[5:]) for d in (Path(out) / "checkpoints").glob("step_*")] if out.exists() else []
    return max(steps, default=-1)


def test_train_job_rank_killed_then_resumed_on_2_and_1_ranks(tmp_path):
    from cke_dist.formats.checkpoint import find_checkpoint, verify_checkpoint

    corpus = tmp_path / "corpus.txt"
    text = np.random.default_rng(0).choice(list(b"abcdefgh ijklmnop\n"), 20_000).astype(np.uint8)
    corpus.write_bytes(text.tobytes())

    # 1. a long run, checkpointing every 2 steps; SIGKILL rank 1 once a few checkpoints exist
    killed = tmp_path / "killed"
    tag = uuid.uuid4().hex
    # Each rank runs under `sh -c '...; exit $?'`: mpiexec then sees a rank that exited with 137 rather
    # than one killed by a signal, which it would answer by killing the whole job itself at once,
    # racing our own error path (-disable-auto-cleanup does not cover signals). We test our path.
    # Each rank writes straight to its own log: what mpiexec forwards can be cut short by the abort.
    rank_cmd = shlex.join([sys.executable, *_train_args(killed, corpus, "train.steps=100000",
                                                        "train.checkpoint_every=2")])
    logs = tmp_path / "rank"
    cmd = [mpiexec(), "-disable-auto-cleanup", "-n", "2", "sh", "-c",
           f"{rank_cmd} > {shlex.quote(str(logs))}$PMI_RANK.log 2>&1; exit $?"]

    def rank_logs():
        return "".join(f"\n--- rank {r} ---\n" + Path(f"{logs}{r}.log").read_text()
                       for r in (0, 1) if Path(f"{logs}{r}.log").exists())

    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(tag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while _newest_step(killed) < 6:
            if proc.poll() is not None or time.monotonic() > deadline:
                kill_group(proc)
                pytest.fail(f"the job ended (exit {proc.poll()}) or stalled before step 6:\n"
                            f"{proc.communicate()[0][-1000:]}{rank_logs()[-3000:]}")
            time.sleep(0.05)
        pid = rank_pid(tag, 1)
        if pid is None:
            kill_group(proc)
            pytest.fail(f"rank 1's process not found:\n{proc.communicate()[0][-1000:]}{rank_logs()[-3000:]}")
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_group(proc)
            proc.communicate()
    out += rank_logs()
    assert proc.returncode != 0, out[-3000:]
    assert "aborting the MPI job after a communication error" in out, out[-3000:]
    assert "PeerLost" in out and "peer rank=1" in out, out[-3000:]

    # 2. the newest complete checkpoint verifies (a half-written one would be a hidden .tmp dir)
    ckpt = find_checkpoint(killed)
    verify_checkpoint(ckpt)
    s = int(ckpt.name.split("_")[1])
    assert 6 <= s < 100000
    target = f"train.steps={s + 3}"

    # 3. resumed on 2 ranks, on 4, and on 1 plain process (same global batch), vs. never interrupted
    runs = {"ref": (2, []), "resume2": (2, ckpt), "resume4": (4, ckpt), "resume1": (1, ckpt)}
    for name, (n, resume) in runs.items():
        args = _train_args(tmp_path / name, corpus, target, "train.checkpoint_every=0", resume=resume)
        if n == 1:
            res = subprocess.run([sys.executable, *args], cwd=REPO, env=job_env(), capture_output=True,
                                 text=True, timeout=120)
            res.stdout += res.stderr
        else:
            res = run_mpi(n, args, timeout=120, env={"CKE_COMM_TIMEOUT": "20"})
        assert res.returncode == 0, f"{name}: {res.stdout[-3000:]}"
    step_ref, ref = _final_params(tmp_path / "ref")
    step2, p2 = _final_params(tmp_path / "resume2")
    step1, p1 = _final_params(tmp_path / "resume1")
    step4, p4 = _final_params(tmp_path / "resume4")
    assert step_ref == step2 == step1 == step4 == s + 3
    np.testing.assert_array_equal(p2, ref)                       # same layout: bitwise
    for other, name in ((p1, "resume1"), (p4, "resume4")):       # other rank counts: float32 rounding
        np.testing.assert_allclose(other, ref, rtol=0, atol=2e-5, err_msg=name)
        assert abs(_val_loss(tmp_path / name) - _val_loss(tmp_path / "ref")) < 1e-5
    assert _val_loss(tmp_path / "resume2") == _val_loss(tmp_path / "ref")
    state = json.loads((find_checkpoint(tmp_path / "resume1") / "trainer_state.json").read_text())
    assert state["world_size"] == 1


def test_zero1_job_and_its_checkpoints_load_into_zero0_and_back(tmp_path, corpus):
    """mpiexec -n 2 cke-dist train --set parallel.zero=1 equals zero=0; a zero=1 checkpoint resumes
    under zero=0 and a zero=0 one under zero=1 (the moments are saved whole)."""
    from jobs import checkpoint_params, logged_losses, run_job

    z0 = run_job(tmp_path, "z0", 2, "train.steps=6")
    z1 = run_job(tmp_path, "z1", 2, "train.steps=6", "parallel.zero=1")
    assert z0.returncode == 0 and z1.returncode == 0, (z0.stdout + z1.stdout)[-3000:]
    np.testing.assert_allclose(logged_losses(tmp_path / "z1"), logged_losses(tmp_path / "z0"), rtol=1e-6)
    ref = checkpoint_params(tmp_path / "z0", 6)
    np.testing.assert_allclose(checkpoint_params(tmp_path / "z1", 6), ref, rtol=0, atol=5e-5)
    for name, src, zero in (("z1_to_z0", "z1", "0"), ("z0_to_z1", "z0", "1")):
        res = run_job(tmp_path, name, 2, "train.steps=6", f"parallel.zero={zero}",
                      resume=tmp_path / src / "checkpoints" / "step_00000003")
        assert res.returncode == 0, res.stdout[-3000:]
        np.testing.assert_allclose(checkpoint_params(tmp_path / name, 6), ref, rtol=0, atol=5e-5, err_msg=name)
