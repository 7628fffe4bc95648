"""Faults end the whole job quickly with an error naming op, group, peer rank and host.

Each test runs tests/ranks/comm_fault_mpi.py under mpiexec with a short deadline.
`-disable-auto-cleanup` stops mpiexec from killing the job itself when one rank
exits, so what ends the job is our own error path (raise, then MPI Abort).
"""
import time

from mpirun import RANKS, run_mpi

JOB = RANKS / "comm_fault_mpi.py"
NO_CLEANUP = ("-disable-auto-cleanup",)


def test_rank_exit_mid_allreduce_aborts_job_with_named_peer():
    t0 = time.monotonic()
    res = run_mpi(3, [JOB, "die"], timeout=60, env={"CKE_COMM_TIMEOUT": "10"}, mpi_flags=NO_CLEANUP)
    took = time.monotonic() - t0
    out = res.stdout
    assert res.returncode != 0, out
    assert "finished, which it must not" not in out
    assert "aborting the MPI job after a communication error" in out, out[-4000:]
    assert "PeerLost" in out and "op=allreduce" in out and "group=world" in out, out[-4000:]
    assert "peer rank=2" in out and "host=" in out, out[-4000:]
    assert took < 40, f"took {took:.1f}s to end the job"


def test_silent_peer_hits_deadline_and_caught_error_still_aborts():
    t0 = time.monotonic()
    # two ranks: the only peer rank 0 can time out on is the silent rank 1
    res = run_mpi(2, [JOB, "stall"], timeout=60, env={"CKE_COMM_TIMEOUT": "2"}, mpi_flags=NO_CLEANUP)
    took = time.monotonic() - t0
    out = res.stdout
    assert res.returncode != 0, out
    assert "caught CommTimeout op=allreduce peer=1 host=" in out, out[-4000:]
    assert "aborting the MPI job after a communication error" in out, out[-4000:]
    assert took < 40, f"the stalled rank kept the job alive for {took:.1f}s"


def test_length_mismatch_is_frame_error_and_buffer_is_safe():
    res = run_mpi(2, [JOB, "mismatch"], timeout=60, env={"CKE_COMM_TIMEOUT": "5"}, mpi_flags=NO_CLEANUP)
    out = res.stdout
    assert res.returncode != 0, out
    assert "FrameError" in out and "frame mismatch: expected tag" in out, out[-4000:]
    assert "OVERWRITTEN" not in out
    assert out.count("sentinel intact") >= 1, out[-4000:]
