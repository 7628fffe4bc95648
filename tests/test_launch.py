"""launch/mpirun_cmd.py: cluster configs become mpiexec command lines that really run."""
import subprocess
import sys

from mpirun import REPO

SCRIPT = REPO / "launch" / "mpirun_cmd.py"


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_two_host_config_makes_the_hydra_command():
    res = _run(str(REPO / "cluster-configs" / "two-hosts.toml"), "--", "cke-dist", "train")
    assert res.returncode == 0, res.stderr
    out = res.stdout.split()
    assert out[1:5] == ["-n", "8", "-hosts", "node1:4,node2:4"]
    assert "CKE_COMM_INTERFACE" in out and out[out.index("CKE_COMM_INTERFACE") + 1] == "eth0"
    # the grid and thread count reach the train job (the user's own --set would come later and win)
    assert out[-8:] == ["cke-dist", "train", "--set", "parallel.tp=1", "--set", "parallel.pp=1",
                        "--set", "train.threads=1"]


def test_localhost_config_runs_a_real_two_rank_job():
    # every rank checks its sum (a failed assert fails the job); rank 0 reports, so lines cannot interleave
    job = [sys.executable, "-c",
           "from cke_dist.comm import init; import numpy as np; w = init(timeout=30); x = np.ones(5) * (w.rank + 1);"
           "w.allreduce(x); assert (x == 3).all(), x; w.barrier();"
           "w.rank == 0 and print(f'ranks {w.size} sum {int(x[0])} over {w.plan.of(0, 1)}', flush=True)"]
    res = _run(str(REPO / "cluster-configs" / "localhost.toml"), "--exec", "--", *job, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ranks 2 sum 3 over shm" in res.stdout


def test_grid_that_does_not_fill_the_slots_is_refused(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('hosts = [{ name = "a", slots = 3 }]\ngrid = { dp = 2 }\n')
    res = _run(str(cfg), "--", "true")
    assert res.returncode != 0 and "does not use the 3 slots" in res.stderr


def test_unknown_key_is_named(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('hosts = [{ name = "a", slots = 1 }]\ntransprot = "tcp"\n')
    res = _run(str(cfg), "--", "true")
    assert res.returncode != 0 and "transprot" in res.stderr


def test_a_configs_grid_reaches_the_train_job(tmp_path, corpus):
    """grid = { tp = 2 } on two local slots: the job starts as dp=1 x tp=2 without any --set of ours."""
    cfg = tmp_path / "tp2.toml"
    cfg.write_text('hosts = [{ name = "localhost", slots = 2 }]\nthreads_per_rank = 1\ngrid = { tp = 2 }\n')
    job = [sys.executable, "-m", "cke_dist.cli", "train", "--no-progress", "--set", f"data.path={tmp_path / 'corpus.txt'}",
           "--set", "train.steps=2", "--set", "sample.max_new_tokens=0", "--set", f"train.out_dir={tmp_path / 'run'}"]
    res = _run(str(cfg), "--exec", "--", *job, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "grid dp=1 x pp=1 x tp=2" in res.stdout + res.stderr
