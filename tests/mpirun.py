"""Run `mpiexec -n N ...` as a subprocess with a timeout and one thread per rank (shared by test files).

    from mpirun import run_mpi, run_pytest_mpi
    res = run_mpi(3, ["tests/comm_fault_job.py", "die"], timeout=60, env={"CKE_COMM_TIMEOUT": "5"})
    run_pytest_mpi(4, "tests/comm_collectives_mpi.py", timeout=120)   # asserts exit 0, shows the output

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

from cke_kernels import THREAD_VARS  # numpy-free; re-exported for the test files that import it from here

REPO = Path(__file__).resolve().parents[1]


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
    full_env = dict(os.environ)
    for var in THREAD_VARS:
        full_env[var] = "1"
    full_env.update(env or {})
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
