"""The communication layer's whole collective suite (tests/ranks/comm_collectives_mpi.py) over each transport that
exists here: shm (one host), tcp (forced), and a mix (ranks posing as two hosts: shm within, tcp between).

tests/integration/test_comm_mpi.py runs the same suite over tcp at 2..5 ranks.
"""
import pytest
from mpirun import RANKS, run_pytest_mpi, run_two_hosts

SUITE = RANKS / "comm_collectives_mpi.py"


@pytest.mark.parametrize("n", [2, 3, 5])
def test_collective_suite_over_shm(n):
    res = run_pytest_mpi(n, SUITE, timeout=150, env={"CKE_TRANSPORT": "shm", "CKE_COMM_HOSTNAME": ""})
    assert " passed" in res.stdout and "failed" not in res.stdout


def test_collective_suite_over_shm_and_tcp_mixed():
    """Ranks 0-1 on "hostA", 2-3 on "hostB": auto takes shm within each and tcp (no RDMA device) across."""
    res = run_two_hosts(2, 2, ["-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider", str(SUITE)],
                        timeout=150, env={"CKE_TRANSPORT": "auto", "CKE_COMM_INTERFACE": "lo"})
    # exit 0 from mpiexec: every rank's pytest ran its tests and passed (pytest exits 5 on none collected)
    assert res.returncode == 0, res.stdout[-8000:]
    assert " passed" in res.stdout and "failed" not in res.stdout
