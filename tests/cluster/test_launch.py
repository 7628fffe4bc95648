"""`cke-dist launch` (cke_dist/cli/launch.py): cluster configs become mpiexec command lines that really run, and sbatch scripts.

The sbatch scripts run on a real Slurm in tests/cluster/test_slurm.py; here only their text is checked.
"""
import shlex
import subprocess
import sys

from mpirun import RANKS, REPO

LAUNCH = [sys.executable, "-m", "cke_dist.cli", "launch"]


def _run(*args, timeout=60):
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, timeout=timeout)


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
    job = [sys.executable, str(RANKS / "comm_cases_mpi.py"), "sum"]
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


def test_slurm_config_makes_an_sbatch_script_whose_srun_starts_the_ranks():
    res = _run(str(REPO / "cluster-configs" / "slurm.toml"), "--slurm", "--", "cke-dist", "train", "--set", "x.y=1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    # sbatch reads #SBATCH lines only up to the first command
    first_cmd = next(i for i, x in enumerate(lines) if x and not x.startswith("#"))
    directives = [x for x in lines[:first_cmd] if x.startswith("#SBATCH")]
    assert directives == ["#SBATCH --job-name=cke-dist", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                          "#SBATCH --cpus-per-task=2", "#SBATCH --partition=cpu", "#SBATCH --time=01:00:00",
                          "#SBATCH --exclusive"]
    assert not any(x.startswith("#SBATCH") for x in lines[first_cmd:])
    for export in ("CKE_TRANSPORT=auto", "CKE_COMM_TIMEOUT=300", "OMP_NUM_THREADS=2", "OPENBLAS_NUM_THREADS=2",
                   "NUMBA_NUM_THREADS=2"):
        assert f"export {export}" in lines
    assert shlex.split(lines[-1]) == ["srun", "--mpi=pmi2", "--cpus-per-task=2", "--kill-on-bad-exit=1",
                                      "cke-dist", "train", "--set", "parallel.tp=2", "--set", "parallel.pp=1",
                                      "--set", "train.threads=2", "--set", "x.y=1"]
    syntax = subprocess.run(["bash", "-n"], input=res.stdout, capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr


def test_slurm_script_quotes_the_job(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('interface = "ib0"\n[slurm]\nnodes = 1\nntasks_per_node = 1\nmpi = "pmix"\n')
    res = _run(str(cfg), "--slurm", "--", "python", "-c", "print('a b; $HOME')")
    assert res.returncode == 0, res.stderr
    assert "export CKE_COMM_INTERFACE=ib0" in res.stdout and "--partition" not in res.stdout
    assert shlex.split(res.stdout.splitlines()[-1])[-3:] == ["python", "-c", "print('a b; $HOME')"]
    assert res.stdout.splitlines()[-1].startswith("srun --mpi=pmix ")


def test_slurm_and_mpiexec_configs_are_not_mixed_up(tmp_path):
    res = _run(str(REPO / "cluster-configs" / "slurm.toml"), "--", "cke-dist", "train")
    assert res.returncode != 0 and "add --slurm" in res.stderr
    res = _run(str(REPO / "cluster-configs" / "localhost.toml"), "--slurm", "--", "cke-dist", "train")
    assert res.returncode != 0 and "no [slurm] table" in res.stderr
    res = _run(str(REPO / "cluster-configs" / "slurm.toml"), "--submit", "--", "true")
    assert res.returncode != 0 and "--submit goes with --slurm" in res.stderr
    both = tmp_path / "both.toml"
    both.write_text('hosts = [{ name = "a", slots = 1 }]\n[slurm]\nnodes = 1\nntasks_per_node = 1\n')
    res = _run(str(both), "--", "true")
    assert res.returncode != 0 and "not both" in res.stderr


def test_bad_slurm_tables_are_named(tmp_path):
    cases = {'[slurm]\nntasks_per_node = 2\n': "[slurm] needs nodes",
             '[slurm]\nnodes = 1\nntasks_per_node = 0\n': "ntasks_per_node = 0",
             '[slurm]\nnodes = 1\nntasks_per_node = 2\nqueue = "x"\n': "unknown [slurm] keys ['queue']",
             '[slurm]\nnodes = 1\nntasks_per_node = 2\ntime = 60\n': "time = 60",
             '[slurm]\nnodes = 1\nntasks_per_node = 2\nsbatch = "--exclusive"\n': "sbatch = '--exclusive'",
             'grid = { tp = 4 }\n[slurm]\nnodes = 1\nntasks_per_node = 2\n':
                 "does not use the 2 tasks of [slurm] (nodes * ntasks_per_node)",
             'slurm = 3\n': "'slurm' must be a table"}
    for i, (text, message) in enumerate(cases.items()):
        cfg = tmp_path / f"bad{i}.toml"
        cfg.write_text(text)
        res = _run(str(cfg), "--slurm", "--", "true")
        assert res.returncode != 0 and message in res.stderr, (text, res.stderr)


def test_docs_show_the_script_slurm_toml_makes():
    doc = (REPO / "docs" / "slurm.md").read_text()
    prompt = "$ cke-dist launch cluster-configs/slurm.toml --slurm -- cke-dist train\n"
    assert prompt in doc
    shown = doc.split(prompt, 1)[1].split("```", 1)[0]
    res = subprocess.run([*LAUNCH, "cluster-configs/slurm.toml", "--slurm", "--", "cke-dist", "train"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == shown, res.stdout + res.stderr


def test_the_old_script_path_still_runs():
    res = subprocess.run([sys.executable, "launch/mpirun_cmd.py", "cluster-configs/slurm.toml", "--slurm", "--",
                          "cke-dist", "train"], cwd=REPO, capture_output=True, text=True, timeout=60)
    new = subprocess.run([*LAUNCH, "cluster-configs/slurm.toml", "--slurm", "--", "cke-dist", "train"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == new.stdout and "#SBATCH" in res.stdout, res.stderr
