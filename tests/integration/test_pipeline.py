"""Pipeline parallelism: the multi-rank suite (tests/ranks/pipeline_mpi.py at 2, 3, 4 and 8 ranks), the schedules
and the stage split in one process."""
import numpy as np
import pytest
from mpirun import RANKS, REPO, run_pytest_mpi


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_pp_suite(n):
    res = run_pytest_mpi(n, RANKS / "pipeline_mpi.py", timeout=400)
    assert "passed" in res.stdout and "failed" not in res.stdout


def test_schedules_run_every_op_once_in_dependency_order():
    from cke_dist.parallel import schedule

    for kind in ("1f1b", "gpipe", "zb"):
        for p in (1, 2, 3, 4):
            for m in (1, 2, 5, 8):
                for s in range(p):
                    ops = schedule(kind, p, s, m)
                    want = {"F", "B"} | ({"W"} if kind == "zb" else set())
                    assert sorted(ops) == sorted((o, i) for o in want for i in range(m)), (kind, p, s, m)
                    for o, i in ops:   # B after its F, W after its B
                        if o != "F":
                            assert ops.index(("F" if o == "B" else "B", i)) < ops.index((o, i))
                    assert ops[-1][0] != "F"


def test_1f1b_and_zb_orders():
    from cke_dist.parallel import schedule

    # stage 0 of 2, 4 micro-batches: one warm-up forward, then one forward and one backward in turn
    assert schedule("1f1b", 2, 0, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2),
                                         ("B", 3)]
    # the last stage: forward then backward of each micro-batch
    assert schedule("1f1b", 2, 1, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    # zb: stage 0 runs each W at once; the last stage (s = 1) holds one back and runs it at the end
    assert [op for op in schedule("zb", 2, 0, 2) if op[0] != "F"] == [("B", 0), ("W", 0), ("B", 1), ("W", 1)]
    assert schedule("zb", 2, 1, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("W", 0), ("W", 1)]
    with pytest.raises(ValueError, match="parallel.schedule = 'pipedream': one of 1f1b, gpipe, zb"):
        schedule("pipedream", 2, 0, 2)


def test_stage_split():
    from cke_dist.model.layout import stage_layers

    # the embedding and the head count as a layer's work each: 8 layers + 2 over 2 stages
    assert stage_layers(8, 2) == [(0, 4), (4, 8)]
    assert stage_layers(4, 3) == [(0, 1), (1, 3), (3, 4)]
    assert stage_layers(5, 3, [1, 3, 1]) == [(0, 1), (1, 4), (4, 5)]
    # by the model's work: an LM head worth 1.42 layers and an embedding of none move a layer forward
    from cke_dist.model import LlamaConfig
    from cke_dist.model.layout import stage_work
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4)
    assert stage_work(cfg) == {"embed_work": 0.0, "head_work": pytest.approx(1.4222, abs=1e-4)}
    assert stage_layers(8, 2, **stage_work(cfg)) == [(0, 5), (5, 8)]
    with pytest.raises(ValueError, match=r"parallel.pp_layers = \[2, 2\]: needs 3 counts"):
        stage_layers(4, 3, [2, 2])
    with pytest.raises(ValueError, match=r"parallel.pp_layers = \[0, 4\]"):
        stage_layers(4, 2, [0, 4])
    with pytest.raises(ValueError, match="pipeline parallel size 5 exceeds num_hidden_layers \\(4\\)"):
        stage_layers(4, 5)


# ---- the train job under mpiexec with parallel.pp ----------------------------------------------

from jobs import TINY, checkpoint_params, logged_losses, run_job  # noqa: E402  (the tiny job)


def test_train_job_pp2_tp2_matches_one_process_and_resumes_bitwise(tmp_path, corpus):
    """mpiexec -n 4 cke-dist train --set parallel.pp=2 --set parallel.tp=2 (zero-bubble schedule)
    against one process; resumed from step 3 on the same layout it equals the uninterrupted run."""
    pp = ["parallel.pp=2", "parallel.tp=2", "parallel.schedule=\"zb\"", "data.grad_accum=4", "data.batch_size=4"]
    one = run_job(tmp_path, "one", 1, "train.steps=6", "data.grad_accum=4", "data.batch_size=4")
    assert one.returncode == 0, one.stdout[-3000:]
    res = run_job(tmp_path, "pp", 4, "train.steps=6", *pp)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "grid dp=1 x pp=2 x tp=2 (pp over shm, tp over shm)" in res.stdout
    np.testing.assert_allclose(logged_losses(tmp_path / "pp"), logged_losses(tmp_path / "one"), rtol=1e-5)
    diff = np.abs(checkpoint_params(tmp_path / "pp", 6) - checkpoint_params(tmp_path / "one", 6))
    assert diff.max() < 2e-4 and np.median(diff) < 1e-7, (diff.max(), np.median(diff))
    res = run_job(tmp_path, "pp_resumed", 4, "train.steps=6", *pp,
               resume=tmp_path / "pp" / "checkpoints" / "step_00000003")
    assert res.returncode == 0, res.stdout[-3000:]
    np.testing.assert_array_equal(checkpoint_params(tmp_path / "pp_resumed", 6), checkpoint_params(tmp_path / "pp", 6))


@pytest.mark.slow
def test_train_job_3d_on_8_ranks(tmp_path, corpus):
    """dp=2 x pp=2 x tp=2 as the job runs it, against one process."""
    one = run_job(tmp_path, "one", 1, "train.steps=3", "train.checkpoint_every=0", "data.grad_accum=2")
    assert one.returncode == 0, one.stdout[-3000:]
    res = run_job(tmp_path, "3d", 8, "train.steps=3", "train.checkpoint_every=0", "data.grad_accum=2",
               "parallel.pp=2", "parallel.tp=2")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "grid dp=2 x pp=2 x tp=2" in res.stdout
    np.testing.assert_allclose(logged_losses(tmp_path / "3d"), logged_losses(tmp_path / "one"), rtol=1e-5)
    diff = np.abs(checkpoint_params(tmp_path / "3d", 3) - checkpoint_params(tmp_path / "one", 3))
    assert diff.max() < 2e-4 and np.median(diff) < 1e-7, (diff.max(), np.median(diff))


def test_a_killed_stage_fails_its_neighbour_fast_with_the_stage_named(tmp_path, corpus):
    import os
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from mpirun import mpiexec
    from jobs import job_env, kill_group, rank_pid

    tag = uuid.uuid4().hex
    args = ["-m", "cke_dist.cli", "train", "--no-progress"]
    for s in [*TINY, f"data.path={tmp_path / 'corpus.txt'}",
              f"train.out_dir={tmp_path / 'killed'}", "train.steps=100000", "parallel.pp=2",
              "train.checkpoint_every=0", "data.grad_accum=4"]:
        args += ["--set", s]
    env = job_env(tag)
    env["CKE_COMM_TIMEOUT"] = "10"
    # each rank under sh, so mpiexec sees an exit, not a signal (see test_data_parallel)
    cmd = [mpiexec(), "-disable-auto-cleanup", "-n", "2", "sh", "-c",
           " ".join(map(repr, [sys.executable, *args])) + " > " + str(tmp_path) + "/rank$PMI_RANK.log 2>&1; exit $?"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "killed" / "metrics.jsonl").exists() or \
                len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not train"
            time.sleep(0.05)
        pid = rank_pid(tag, 1)
        assert pid is not None
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            kill_group(proc)
            proc.communicate()
    log = (tmp_path / "rank0.log").read_text()
    assert proc.returncode != 0
    assert took < 30, took
    assert "aborting the MPI job after a communication error" in log, log[-3000:]
    assert "peer rank=1" in log and "host=" in log, log[-3000:]
    assert "pipeline stage 0 waiting for the gradients of micro-batch" in log or "group[0,1]" in log, log[-3000:]
