"""shm links between real MPI ranks (run by tests/integration/test_shm_link.py::test_mpi_shm_suite under mpiexec -n 2 and 3;
plain pytest skips this file): every pair, every size class, mismatches, deadlines, no names left in /dev/shm.
"""
import os
import threading
import time

import numpy as np
import pytest
from mpi4py import MPI

from cke_dist.comm import shm
from cke_dist.comm.errors import CommTimeout, FrameError

comm = MPI.COMM_WORLD
SIZES = [0, 1, 12345, (1 << 16) + 1, (5 << 20) + 3]  # empty, one byte, odd, just over one slot, several MB


def _soon(s=20.0):
    return time.monotonic() + s


def _data(src, dst, nbytes):
    return np.random.default_rng(src * 1000 + dst * 10 + len(str(nbytes))).integers(0, 256, nbytes, np.uint8)


@pytest.fixture(scope="module")
def links():
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(MPI.Get_processor_name())
    links, failed = shm.connect_shm(comm, [p for p in range(size) if p != rank], hosts,
                                    nslots=3, slot_bytes=1 << 16)
    assert failed == {}
    assert sorted(links) == [p for p in range(size) if p != rank]
    yield links
    comm.Barrier()
    for link in links.values():
        link.close()


@pytest.mark.mpi(min_size=2)
def test_no_names_left_after_setup(links):
    pids = comm.allgather(os.getpid())
    comm.Barrier()
    left = [f for f in os.listdir(shm.SHM_DIR) if any(f.startswith(f"{shm.PREFIX}{p}-") for p in pids)]
    assert left == []


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("nbytes", SIZES)
def test_all_pairs_exchange(links, nbytes):
    """Every rank sends to every other rank at once (a send thread per peer), checking every byte."""
    rank = comm.Get_rank()
    errors = []

    def send(p):
        try:
            links[p].send(memoryview(_data(rank, p, nbytes)), 11, _soon())
        except Exception as e:  # reported below: a thread's exception would otherwise vanish
            errors.append(e)
    threads = [threading.Thread(target=send, args=(p,)) for p in links]
    for t in threads:
        t.start()
    for p in sorted(links):
        out = np.empty(nbytes, np.uint8)
        links[p].recv(memoryview(out), 11, _soon())
        assert np.array_equal(out, _data(p, rank, nbytes)), f"from rank {p}, {nbytes} bytes"
    for t in threads:
        t.join()
    assert errors == []
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_tag_and_length_mismatch(links):
    rank = comm.Get_rank()
    if rank == 0:
        links[1].send(memoryview(np.arange(200000, dtype=np.float32)), 5, _soon())  # 800 KB: many chunks
        links[1].send(memoryview(np.ones(10, np.float64)), 6, _soon())
        links[1].send(memoryview(np.ones(3, np.int32)), 7, _soon())
    elif rank == 1:
        with pytest.raises(FrameError, match=r"expected tag 0x63 length 800000, got tag 0x5 length 800000"):
            links[0].recv(memoryview(np.empty(200000, np.float32)), 99, _soon())
        backing = np.zeros(20, np.float64)
        with pytest.raises(FrameError, match=r"expected tag 0x6 length 40, got tag 0x6 length 80"):
            links[0].recv(memoryview(backing[:5]), 6, _soon())
        assert not backing.any()
        out = np.zeros(3, np.int32)
        links[0].recv(memoryview(out), 7, _soon())
        assert out.tolist() == [1, 1, 1]
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_deadline(links):
    rank = comm.Get_rank()
    if rank == 1:
        t0 = time.monotonic()
        with pytest.raises(CommTimeout, match=r"peer rank=0"):
            links[0].recv(memoryview(np.empty(8, np.uint8)), 1, time.monotonic() + 0.3)
        assert 0.3 <= time.monotonic() - t0 < 3.0
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_soak_random_sizes_both_directions(links):
    """300 messages of random sizes (0 .. 3.5 slots: ring wrap-around at every offset) and tags, ranks 0 and 1
    sending to each other at once, every byte checked."""
    rank = comm.Get_rank()
    if rank > 1:
        comm.Barrier()
        return
    peer = 1 - rank
    plan = np.random.default_rng(7).integers(0, 7 * (1 << 15), size=(2, 300))  # per sender: 300 sizes

    def payload(src, k, n):
        return np.full(n, (src * 131 + k) % 251, np.uint8)
    errors = []

    def sender():
        try:
            for k, n in enumerate(plan[rank]):
                links[peer].send(memoryview(payload(rank, k, int(n))), 1000 + k, _soon())
        except Exception as e:
            errors.append(e)
    t = threading.Thread(target=sender)
    t.start()
    for k, n in enumerate(plan[peer]):
        out = np.empty(int(n), np.uint8)
        links[peer].recv(memoryview(out), 1000 + k, _soon())
        assert np.array_equal(out, payload(peer, k, int(n))), f"message {k} ({n} bytes)"
    t.join()
    assert errors == []
    comm.Barrier()
