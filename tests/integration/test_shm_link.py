"""shm links and the slot protocol: in one process (two links on one real segment, two threads), and the drivers
that run tests/ranks/shm_link_mpi.py under mpiexec and a job with a killed rank.

Every test uses real /dev/shm segments, real futexes and (for the drivers) real MPI processes.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from mpirun import PROGRAMS, RANKS, run_mpi, run_program, run_pytest_mpi, threads_env

from cke_dist.comm import shm
from cke_dist.comm.errors import CommTimeout, FrameError, PeerLost


def _pair(nslots=4, slot_bytes=1 << 16):
    """Two ShmLinks on one segment in this process: a (side 0, 'rank 0') and b (side 1, 'rank 1')."""
    name = f"{shm.PREFIX}{os.getpid()}-test{time.monotonic_ns()}-0-1"
    s0 = shm._create(name, nslots, slot_bytes)
    s1 = shm._attach(name)
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name)), "the name must be gone once both ends attached"
    pid = os.getpid()
    return shm.ShmLink(1, "here", s0, 0, pid), shm.ShmLink(0, "here", s1, 1, pid)


def _soon(s=5.0):
    return time.monotonic() + s


def _exchange(sender, receiver, data, tag=3, out=None):
    out = np.empty_like(data) if out is None else out
    t = threading.Thread(target=lambda: sender.send(memoryview(data), tag, _soon()))
    t.start()
    try:
        receiver.recv(memoryview(out), tag, _soon())
    finally:
        t.join()
    return out


@pytest.mark.parametrize("nbytes", [0, 1, 63, 65472, 65473, 3 * 65472 + 17, (5 << 20) + 3])
def test_sizes_round_trip_both_directions(nbytes):
    a, b = _pair()
    try:
        data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
        assert np.array_equal(_exchange(a, b, data), data)
        back = data[::-1].copy()
        assert np.array_equal(_exchange(b, a, back), back)
    finally:
        a.close(); b.close()


def test_float_arrays_and_message_order():
    a, b = _pair(nslots=2, slot_bytes=4096)
    try:
        msgs = [np.arange(n, dtype=np.float32) * (i + 1) for i, n in enumerate([5, 3000, 0, 1, 2048])]

        def send_all():
            for i, m in enumerate(msgs):
                a.send(memoryview(m), 100 + i, _soon())
        t = threading.Thread(target=send_all)
        t.start()
        for i, m in enumerate(msgs):
            got = np.full_like(m, -1.0)
            b.recv(memoryview(got), 100 + i, _soon())
            assert np.array_equal(got, m)
        t.join()
    finally:
        a.close(); b.close()


def test_tag_mismatch_is_frame_error_and_link_stays_in_step():
    a, b = _pair(nslots=2, slot_bytes=4096)
    try:
        big = np.arange(10000, dtype=np.uint8)  # several chunks: the discard must consume them all
        t = threading.Thread(target=lambda: (a.send(memoryview(big), 7, _soon()),
                                             a.send(memoryview(big[:10]), 9, _soon())))
        t.start()
        guard = np.zeros(10000 + 64, np.uint8)
        with pytest.raises(FrameError, match=r"shm frame mismatch: expected tag 0x8 length 10000, got tag 0x7 length 10000"):
            b.recv(memoryview(guard[:10000]), 8, _soon())
        assert not guard.any(), "nothing may be written for a mismatched message"
        nxt = np.zeros(10, np.uint8)
        b.recv(memoryview(nxt), 9, _soon())
        t.join()
        assert np.array_equal(nxt, big[:10])
    finally:
        a.close(); b.close()


@pytest.mark.parametrize("slot_bytes", [64 + 4096, 64 + 1002])  # 1002: chunks split elements -> staged fallback
@pytest.mark.parametrize("op,dtype", [("sum", np.float32), ("prod", np.float64), ("max", np.int32),
                                      ("min", np.int64)])
def test_recv_reduce_matches_recv_then_combine(slot_bytes, op, dtype):
    """recv_reduce folds a multi-chunk message into dst straight from the slots (or staged when chunks would
    split elements), with the operand order asked for: bitwise what recv + the ufunc gives."""
    from cke_dist.comm.reduce_ops import combine
    a, b = _pair(nslots=3, slot_bytes=slot_bytes)
    try:
        rng = np.random.default_rng(7)
        n = 5 * 4096 // np.dtype(dtype).itemsize + 3  # several chunks and a short last one
        msgs = [(rng.standard_normal(n) * 50).astype(dtype) for _ in range(2)]
        t = threading.Thread(target=lambda: [a.send(memoryview(m), 11 + i, _soon()) for i, m in enumerate(msgs)])
        t.start()
        dst = (rng.standard_normal(n) * 50).astype(dtype)
        want = dst.copy()
        combine(op, msgs[0], want, want)
        b.recv_reduce(dst, 11, _soon(), op)
        assert dst.tobytes() == want.tobytes()
        combine(op, want, msgs[1], want)  # received second
        b.recv_reduce(dst, 12, _soon(), op, received_first=False)
        t.join()
        assert dst.tobytes() == want.tobytes()
    finally:
        a.close(); b.close()


def test_recv_reduce_mismatch_leaves_dst_untouched_and_link_in_step():
    a, b = _pair(nslots=2, slot_bytes=4096)
    try:
        big = np.ones(3000, np.float32)  # several chunks: the discard must consume them all
        t = threading.Thread(target=lambda: (a.send(memoryview(big), 7, _soon()),
                                             a.send(memoryview(big[:10]), 9, _soon())))
        t.start()
        dst = np.zeros(3000, np.float32)
        with pytest.raises(FrameError, match=r"expected tag 0x8 length 12000, got tag 0x7 length 12000"):
            b.recv_reduce(dst, 8, _soon(), "sum")
        assert not dst.any(), "nothing may be reduced from a mismatched message"
        b.recv_reduce(dst[:10], 9, _soon(), "sum")
        t.join()
        assert np.array_equal(dst[:10], big[:10]) and not dst[10:].any()
    finally:
        a.close(); b.close()


def test_length_mismatch_never_writes_past_buffer():
    a, b = _pair()
    try:
        t = threading.Thread(target=lambda: a.send(memoryview(np.ones(100, np.uint8)), 1, _soon()))
        t.start()
        backing = np.zeros(200, np.uint8)
        with pytest.raises(FrameError, match=r"expected tag 0x1 length 50, got tag 0x1 length 100"):
            b.recv(memoryview(backing[:50]), 1, _soon())
        t.join()
        assert not backing.any()
    finally:
        a.close(); b.close()


def test_recv_deadline_raises_comm_timeout_naming_peer():
    a, b = _pair()
    try:
        t0 = time.monotonic()
        with pytest.raises(CommTimeout, match=r"peer rank=0.*host=here"):
            b.recv(memoryview(np.empty(4, np.uint8)), 1, time.monotonic() + 0.2)
        assert 0.2 <= time.monotonic() - t0 < 2.0
    finally:
        a.close(); b.close()


def test_send_deadline_when_receiver_takes_nothing():
    a, b = _pair(nslots=2, slot_bytes=4096)
    try:
        with pytest.raises(CommTimeout, match="free slot"):
            a.send(memoryview(np.zeros(100000, np.uint8)), 1, time.monotonic() + 0.2)
        with pytest.raises(Exception, match="unusable"):  # cut mid-message: the link refuses further use
            a.send(memoryview(np.zeros(1, np.uint8)), 1, _soon())
    finally:
        a.close(); b.close()


def test_closed_peer_wakes_blocked_receiver():
    a, b = _pair()
    try:
        threading.Timer(0.1, a.close).start()
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match="closed"):
            b.recv(memoryview(np.empty(4, np.uint8)), 1, _soon(10))
        assert time.monotonic() - t0 < 2.0
    finally:
        a.close(); b.close()


def test_data_sent_before_close_is_still_received():
    a, b = _pair()
    data = np.arange(100, dtype=np.uint8)
    a.send(memoryview(data), 4, _soon())
    a.close()
    out = np.empty_like(data)
    b.recv(memoryview(out), 4, _soon())
    assert np.array_equal(out, data)
    b.close()


def test_dead_peer_process_raises_peer_lost():
    """The peer attaches from another process and is SIGKILLed while we wait: PeerLost names the dead pid
    long before the deadline."""
    name = f"{shm.PREFIX}{os.getpid()}-dead{time.monotonic_ns()}-0-1"
    seg = shm._create(name, 2, 4096)
    child = subprocess.Popen([sys.executable, str(PROGRAMS / "shm_peer.py"), "attach", name], env=threads_env())
    link = shm.ShmLink(1, "child", seg, 0, child.pid)
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match=rf"process {child.pid} died.*peer rank=1, host=child"):
            link.recv(memoryview(np.empty(16, np.uint8)), 1, _soon(30))
        assert time.monotonic() - t0 < 10
    finally:
        child.wait()
        link.close()
        shm._unlink(name)


def test_sweep_removes_segment_of_killed_creator(tmp_path):
    """A process killed between creating a segment and its peer attaching leaves a name; the next setup's
    sweep removes it (and leaves a live process's segment alone)."""
    p = run_program("shm_peer.py", "create", timeout=60)
    assert p.returncode == -signal.SIGKILL
    name = p.stdout.strip()
    path = os.path.join(shm.SHM_DIR, name)
    assert os.path.exists(path), "SIGKILL skips atexit: the name is left behind"
    live = f"{shm.PREFIX}{os.getpid()}-live-0-1"
    shm._create(live, 2, 4096)
    try:
        removed = shm.sweep_stale(now=time.time() + 60)
        assert name in removed and not os.path.exists(path)
        assert os.path.exists(os.path.join(shm.SHM_DIR, live))
    finally:
        shm._unlink(live)


@pytest.mark.parametrize("n", [2, 3])
def test_mpi_shm_suite(n):
    res = run_pytest_mpi(n, RANKS / "shm_link_mpi.py", timeout=120)
    assert " passed" in res.stdout and "skipped" not in res.stdout


def test_killed_rank_leaves_no_segment(tmp_path):
    t0 = time.monotonic()
    p = run_mpi(2, [RANKS / "comm_cases_mpi.py", "shm_kill", tmp_path], timeout=60)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 30, "the survivor must not wait for its 30 s deadline"
    pids = [(tmp_path / f"pid{r}").read_text() for r in (0, 1)]
    left = [f for f in os.listdir(shm.SHM_DIR) if any(f.startswith(f"{shm.PREFIX}{pid}-") for pid in pids)]
    assert left == [], f"segments left behind: {left}"
