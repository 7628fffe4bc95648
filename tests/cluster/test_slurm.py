"""A real one-node Slurm (Debian's slurm-wlm and munge) started on this machine runs what
`cke-dist launch --slurm` makes: the sbatch script's srun starts the ranks of a training job.

The daemons are ours alone: their own munged and key, a slurm.conf in a temp dir (handed to every
client as SLURM_CONF), free ports, state and spool dirs in the temp dir; they are stopped when the
module ends, passed or not. Where the packages are missing, we are not root, or the daemons do not
come up, the tests skip with the reason (the daemon's last log lines).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobs import TINY
from mpirun import RANKS, REPO

LAUNCH = [sys.executable, "-m", "cke_dist.cli", "launch"]
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scancel")
INSTALL = "apt-get install slurm-wlm munge"
START_S = 30


def _find(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name) or next((f"{d}/{name}" for d in ("/usr/sbin", "/usr/local/sbin")
                                       if os.access(f"{d}/{name}", os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(d: Path, *names: str, n: int = 12) -> str:
    """The last lines of each daemon's log file, else of what it printed (the same lines under -D)."""
    lines = []
    for name in names:
        p = next((f for f in (d / f"{name}.log", d / f"{name}.out") if f.exists() and f.stat().st_size), None)
        if p is not None:
            lines += [f"{p.name}: {x}" for x in p.read_text(errors="replace").splitlines()[-n:]]
    return "\n".join(lines) or "(no log)"


def _slurm_conf(d: Path, host: str, munge_sock: Path) -> str:
    # CPUs: at least the job's 2 tasks, whatever this machine has (config_overrides: believe the config).
    # linuxproc/task none: no cgroups, which containers rarely give. MpiDefault none: the script's own
    # --mpi=pmi2 is what must make the ranks one world.
    return f"""\
ClusterName=ckeslurmtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_sock}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={max(2, os.cpu_count() or 1)} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=10 State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment (SLURM_CONF, PATH) in which sbatch/srun talk to a one-node Slurm of our own."""
    tools = {name: _find(name) for name in TOOLS}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        pytest.skip(f"slurm-wlm not installed ({', '.join(missing)} not found): {INSTALL}")
    if os.geteuid() != 0:
        pytest.skip("a test Slurm needs root: slurmd starts each job step as the job's user")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir()
    key, sock = d / "munge" / "munge.key", d / "munge" / "munge.sock"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = d / "slurm.conf"
    conf.write_text(_slurm_conf(d, socket.gethostname().split(".")[0], sock))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = os.pathsep.join([str(Path(tools["srun"]).parent), env.get("PATH", "")])
    procs = {}

    def start(name, *args):
        with open(d / f"{name}.out", "w") as out:
            procs[name] = subprocess.Popen([tools[name], *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)

    def gone(name):
        p = procs[name]
        if p.poll() is not None:
            pytest.skip(f"{name} exited ({p.returncode}) while starting:\n{_tail(d, name)}")

    try:
        # --force: munged's checks of the dirs above a pytest temp dir are for a system install, not this one
        start("munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
              f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munge/seed")
        end = time.monotonic() + START_S
        while not sock.exists():
            gone("munged")
            if time.monotonic() > end:
                pytest.skip(f"munged made no socket in {START_S} s:\n{_tail(d, 'munged')}")
            time.sleep(0.1)
        start("slurmctld", "-D", "-f", str(conf))
        start("slurmd", "-D", "-f", str(conf), "-N", socket.gethostname().split(".")[0])
        state = ""
        while state != "idle":
            for name in ("munged", "slurmctld", "slurmd"):
                gone(name)
            if time.monotonic() > end:
                pytest.skip(f"the Slurm node is not idle {START_S} s after start (sinfo: {state!r}):\n"
                            f"{_tail(d, 'slurmctld', 'slurmd')}")
            time.sleep(0.3)
            res = subprocess.run([tools["sinfo"], "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True,
                                 timeout=20)
            state = (res.stdout.strip() or res.stderr.strip()) if res.returncode == 0 else res.stderr.strip()
        yield env
    finally:
        # a job still running (a test timed out) would outlive slurmd: its steps are not slurmd's children
        if "slurmctld" in procs and procs["slurmctld"].poll() is None:
            subprocess.run([tools["scancel"], "--full", "--quiet", "--user=root"], env=env, capture_output=True,
                           timeout=20)
            time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            p = procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _cke_dist() -> list[str]:
    """`cke-dist` as a user types it, from this Python's environment (sbatch's PATH may lack the venv)."""
    exe = Path(sys.executable).with_name("cke-dist")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cke_dist.cli"]


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "one-node.toml"
    cfg.write_text('threads_per_rank = 1\ntimeout = 30\ngrid = { dp = 2 }\n\n'
                   '[slurm]\nnodes = 1\nntasks_per_node = 2\ntime = "00:05:00"\njob_name = "cke-test"\n')
    return cfg


def test_printed_sbatch_script_trains_on_two_ranks_under_srun(slurm, tmp_path, corpus):
    """The user's way: print the script, sbatch it; srun's two ranks train as one dp=2 job."""
    job = [*_cke_dist(), "train", "--no-progress"]
    for s in [*TINY, f"data.path={tmp_path / 'corpus.txt'}", f"train.out_dir={tmp_path / 'run'}", "train.steps=3"]:
        job += ["--set", s]
    made = subprocess.run([*LAUNCH, str(_config(tmp_path)), "--slurm", "--", *job],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    script = tmp_path / "train.sbatch"
    script.write_text(made.stdout)
    out = tmp_path / "job.out"
    res = subprocess.run(["sbatch", "--wait", f"--output={out}", str(script)], cwd=REPO, env=slurm,
                         capture_output=True, text=True, timeout=120)
    log = out.read_text() if out.exists() else "(no job output)"
    assert res.returncode == 0, f"sbatch --wait exit {res.returncode}: {res.stdout}{res.stderr}\n{log[-6000:]}"
    assert "Submitted batch job" in res.stdout
    assert re.search(r"transport=auto: 2 ranks on 1 host\(s\) \(\S+: ranks 0-1\)", log), log
    assert "grid dp=2 x pp=1 x tp=1 (dp over shm)" in log, log
    assert re.search(r"step 3, train loss \d+\.\d+, val loss \d+\.\d+", log), log
    assert (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()


def test_submit_hands_the_script_to_sbatch(slurm, tmp_path):
    """--submit pipes the same script to sbatch (here with SBATCH_WAIT/SBATCH_OUTPUT); every rank checks its sum."""
    job = [sys.executable, str(RANKS / "comm_cases_mpi.py"), "sum"]
    out = tmp_path / "job.out"
    res = subprocess.run([*LAUNCH, str(_config(tmp_path)), "--slurm", "--submit", "--", *job],
                         cwd=REPO, env=dict(slurm, SBATCH_WAIT="1", SBATCH_OUTPUT=str(out)),
                         capture_output=True, text=True, timeout=120)
    log = out.read_text() if out.exists() else "(no job output)"
    assert res.returncode == 0, f"exit {res.returncode}: {res.stdout}{res.stderr}\n{log[-4000:]}"
    assert "ranks 2 sum 3 over" in log, log   # each rank asserts its own sum


def test_srun_without_pmi_is_refused_not_run_as_copies(slurm):
    """Plain srun (MpiDefault=none) gives every task a world of its own; init refuses, naming --mpi=pmi2."""
    res = subprocess.run(["srun", "--mpi=none", "-n", "2", "-t", "1", sys.executable, "-c",
                          "from cke_dist.comm import init; init()"], cwd=REPO, env=slurm, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0
    assert "srun started 2 tasks but MPI sees each as a world of 1" in res.stderr, res.stdout + res.stderr
    assert "srun --mpi=pmi2" in res.stderr
