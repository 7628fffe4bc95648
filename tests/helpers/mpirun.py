"""Run `mpiexec -n N ...` as a subprocess with a timeout and one thread per rank (shared by test files).

    from mpirun import run_mpi, run_pytest_mpi
    res = run_mpi(3, [RANKS / "comm_fault_mpi.py", "die"], timeout=60, env={"CKE_COMM_TIMEOUT": "5"})
    run_pytest_mpi(4, RANKS / "comm_collectives_mpi.py", timeout=120)   # asserts exit 0, shows the output

Several ranks share two cores here, so every rank gets one BLAS/OpenMP/numba
thread. A run past its timeout is killed with its whole process group and
reported with what it printed, never left hanging.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from cke_kernels import THREAD_VARS  # numpy-free

REPO = Path(__file__).resolve().parents[2]
RANKS = REPO / "tests" / "ranks"          # programs run under mpiexec (pytest-mpi files and plain scripts)
PROGRAMS = REPO / "tests" / "programs"    # programs a test runs as one separate process


HELPERS = REPO / "tests" / "helpers"


def threads_env(n: int = 1, **extra) -> dict:
    """os.environ with n BLAS/OpenMP/numba threads, the test helpers importable, plus extra variables:
    the environment of a program the tests start."""
    path = os.pathsep.join(p for p in (str(HELPERS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **{var: str(n) for var in THREAD_VARS}, "PYTHONPATH": path, **extra}


def run_program(name: str, *args, threads: int = 1, timeout: float = 300, env=None, **kw):
    """python tests/programs/<name> args... in its own process; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, str(PROGRAMS / name), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=threads_env(threads, **(env or {})), **kw)


def mpiexec() -> str:
    found = Path(sys.executable).with_name("mpiexec")
    if found.exists():
        return str(found)
    found = shutil.which("mpiexec")
    if not found:
        raise RuntimeError("mpiexec not found: install the 'mpich' wheel (pip install mpich) or an MPI library")
    return found


def run_mpi(n: int, args, timeout: float = 120, env=None, mpi_flags=()) -> subprocess.CompletedProcess:
    """`mpiexec [mpi_flags] -n n python args...` from the repo root; stdout+stderr merged into .stdout."""
    full_env = threads_env(1, **(env or {}))
    cmd = [mpiexec(), *mpi_flags, "-n", str(n), sys.executable, *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} still running after {timeout}s; killed. Output:\n{out[-6000:]}") \
            from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def run_pytest_mpi(n: int, test_file, timeout: float = 120, env=None, extra=()) -> subprocess.CompletedProcess:
    """Run a pytest-mpi file on n ranks and assert every rank passed."""
    res = run_mpi(n, ["-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider", *extra, str(test_file)],
                  timeout=timeout, env=env)
    assert res.returncode == 0, f"{test_file} on {n} ranks failed (exit {res.returncode}):\n{res.stdout[-8000:]}"
    return res


def run_two_hosts(n_a, n_b, args, timeout=120, env=None):
    """`args` (after python) on n_a ranks posing as host "hostA" and n_b ranks as "hostB" (MPMD sections with
    their own CKE_COMM_HOSTNAME): one machine tested as two hosts."""
    return run_mpi(n_a, [*args, ":", "-n", str(n_b), "-env", "CKE_COMM_HOSTNAME", "hostB", sys.executable, *args],
                   timeout=timeout, env=env, mpi_flags=["-env", "CKE_COMM_HOSTNAME", "hostA"])


# ---- inside a rank ------------------------------------------------------------------------------
def shared_dir(world, tmp_path_factory):
    """A directory made by rank 0 whose path every rank learns (one host: the ranks share /tmp)."""
    import numpy as np
    buf = np.zeros(512, np.int32)
    if world.rank == 0:
        raw = str(tmp_path_factory.mktemp("shared")).encode()
        buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    world.broadcast(buf)
    buf = buf.astype(np.uint8)
    return Path(bytes(buf).rstrip(b"\0").decode())
