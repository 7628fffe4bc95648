"""Driver: the multi-rank collective suite (tests/ranks/comm_collectives_mpi.py) over tcp at 2, 3, 4 and 5 ranks
(tests/integration/test_shm_collectives.py runs it over shm and a shm/tcp mix).

One mpiexec launch per rank count runs every collective, op, dtype and length,
so plain `pytest -q` covers the multi-rank suite in seconds.
"""
import pytest
from mpirun import RANKS, run_mpi, run_pytest_mpi


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_collectives_suite(n):
    res = run_pytest_mpi(n, RANKS / "comm_collectives_mpi.py", timeout=150, env={"CKE_TRANSPORT": "tcp"})
    assert "passed" in res.stdout and "failed" not in res.stdout


CASES = RANKS / "comm_cases_mpi.py"


def test_collectives_suite_ring_forced_over_striped_streams():
    """Every size through the ring (tiny segments too), each peer pair over 3 TCP streams."""
    env = {"CKE_ALLREDUCE_RING_BYTES": "8", "CKE_TCP_STREAMS": "3", "CKE_TRANSPORT": "tcp"}
    res = run_pytest_mpi(3, RANKS / "comm_collectives_mpi.py", timeout=150, env=env)
    assert "passed" in res.stdout and "failed" not in res.stdout


def test_ranks_posing_as_two_hosts_over_named_interface():
    """CKE_COMM_HOSTNAME gives each rank its own 'host' (so errors and plans see two hosts); an
    explicit interface lets them talk over loopback."""
    env = {"CKE_COMM_INTERFACE": "lo"}
    res = run_mpi(2, [CASES, "two_hosts"], timeout=60, env=env)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "two-host ok 0 fakehost1;" in res.stdout and "two-host ok 1 fakehost0;" in res.stdout


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_ring_with_chunks_below_the_eager_size_sends_every_chunk(transport):
    """CKE_RING_CHUNK_BYTES below a link's eager size cut a ring segment into several messages; the
    eager branch once sent only the first, so a 1 MiB allreduce waited for the rest until the deadline."""
    res = run_mpi(2, [CASES, "ring"], timeout=60,
                  env={"CKE_RING_CHUNK_BYTES": "4096", "CKE_TRANSPORT": transport, "CKE_COMM_TIMEOUT": "10"})
    assert res.returncode == 0 and res.stdout.count("ring ok") == 2, res.stdout[-3000:]


def test_closing_a_striped_world_ends_its_stream_threads():
    """StripedLink.close once left its per-stream worker threads running."""
    res = run_mpi(2, [CASES, "stream_threads"], timeout=60, env={"CKE_TCP_STREAMS": "3", "CKE_TRANSPORT": "tcp"})
    assert res.returncode == 0 and res.stdout.count("threads ended") == 2, res.stdout[-3000:]


def test_rank_0_prints_the_transport_plan_at_start_unless_quiet():
    """The plan was log.info with no logging configured, so no user saw it."""
    res = run_mpi(2, [CASES, "plan"], timeout=60, env={"CKE_TRANSPORT": "auto"})
    assert res.returncode == 0, res.stdout[-3000:]
    assert res.stdout.count("cke-dist comm: transport=auto: 2 ranks on 1 host(s)") == 1, res.stdout
    assert res.stdout.count("cke-dist comm:   shm: pairs 0-1 (same host)") == 1, res.stdout
    quiet = run_mpi(2, [CASES, "plan"], timeout=60, env={"CKE_COMM_QUIET": "1"})
    assert quiet.returncode == 0 and "cke-dist comm:" not in quiet.stdout, quiet.stdout
