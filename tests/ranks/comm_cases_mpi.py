"""Small comm jobs the integration and cluster tests run under mpiexec, one per case; each rank checks
its own result (a failed assert fails the job) and prints a line the test counts.

    mpiexec -n 2 python tests/ranks/comm_cases_mpi.py two_hosts       # ranks posing as two hosts
    mpiexec -n 2 python tests/ranks/comm_cases_mpi.py ring            # a 1 MiB ring allreduce
    mpiexec -n 2 python tests/ranks/comm_cases_mpi.py stream_threads  # close() ends tcp stream threads
    mpiexec -n 2 python tests/ranks/comm_cases_mpi.py plan            # init and a barrier (rank 0 prints the plan)
    mpiexec -n 2 python tests/ranks/comm_cases_mpi.py rdma_fails      # rdma setup with no device
    mpiexec -n 2 python tests/ranks/comm_cases_mpi.py sum             # allreduce of ones; rank 0 reports
    mpiexec -n 2 python tests/ranks/comm_cases_mpi.py shm_kill DIR    # rank 1 SIGKILLed mid-send over shm
    mpiexec -n 4 python tests/ranks/comm_cases_mpi.py links           # an allreduce; each rank names its links
    mpiexec -n 2 python tests/ranks/comm_cases_mpi.py hold            # up, then asleep until killed
"""
import os
import signal
import sys
import threading
import time

import numpy as np
from mpi4py import MPI


def two_hosts():
    os.environ["CKE_COMM_HOSTNAME"] = f"fakehost{MPI.COMM_WORLD.rank}"
    from cke_dist.comm import init
    w = init(timeout=20)
    assert w.hosts == ["fakehost0", "fakehost1"], w.hosts
    x = np.arange(100_003, dtype=np.float64) * (w.rank + 1)
    w.allreduce(x)
    assert (x == np.arange(100_003) * 3).all()
    print(f"two-host ok {w.rank} {w.link(1 - w.rank).host};", flush=True)


def ring():
    from cke_dist.comm import init
    w = init(timeout=10)
    x = np.arange(1 << 18, dtype=np.float32) * (w.rank + 1)
    w.allreduce(x)
    assert (x == np.arange(1 << 18, dtype=np.float32) * 3).all()
    print("ring ok", w.rank, flush=True)


def stream_threads():
    from cke_dist.comm import init
    w = init(timeout=10)
    x = np.ones(1 << 20, np.float32)
    w.allreduce(x)
    assert (x == 2).all()
    n = sum(t.name.startswith("cke-tcp-") for t in threading.enumerate())
    assert n > 0, n
    w.close()
    time.sleep(0.5)
    left = [t.name for t in threading.enumerate() if t.name.startswith("cke-tcp-") and t.is_alive()]
    assert not left, left
    print("threads ended", w.rank, flush=True)


def plan():
    from cke_dist.comm import init
    init().barrier()


def rdma_fails():
    from cke_dist.comm import rdma
    c = MPI.COMM_WORLD
    r = c.Get_rank()
    links, failed = rdma.connect_rdma(c, [1 - r], ["a", "b"], rdma.probe())
    assert links == {} and list(failed) == [1 - r], failed
    assert failed[1 - r].startswith(f"rdma: setup failed on rank {r}: rdma: "), failed
    print("failed reported", r, flush=True)


def sum_ones():
    from cke_dist.comm import init
    w = init(timeout=30)
    x = np.ones(5) * (w.rank + 1)
    w.allreduce(x)
    assert (x == 3).all(), x
    w.barrier()
    if w.rank == 0:   # one rank reports, so lines from two ranks cannot interleave
        print(f"ranks {w.size} sum {int(x[0])} over {w.plan.of(0, 1)}", flush=True)


def shm_kill(out_dir):
    from cke_dist.comm.errors import PeerLost
    from cke_dist.comm.shm import connect_shm
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    with open(os.path.join(out_dir, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    links, failed = connect_shm(comm, [1 - rank], ["h", "h"], nslots=2, slot_bytes=1 << 16)
    assert not failed, failed
    link = links[1 - rank]
    if rank == 1:
        time.sleep(0.5)  # rank 0 is now blocked in the middle of a 64 MiB send, waiting for credits
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        link.send(memoryview(np.ones(64 << 20, np.uint8)), 1, time.monotonic() + 30)
    except PeerLost as e:
        print("SURVIVOR:", e, flush=True)
        sys.exit(3)


def links():
    import socket

    from cke_dist.comm import init
    w = init(timeout=20)
    x = np.arange(300_007, dtype=np.float64) * (w.rank + 1)
    w.allreduce(x)
    assert (x == np.arange(300_007) * w.size * (w.size + 1) / 2).all()
    kinds = " ".join(f"{p}:{link.kind}" for p, link in sorted(w.links.items()))
    print(f"rank {w.rank} on {socket.gethostname()} listens {w.facts[w.rank]['tcp'][0]} links {kinds}", flush=True)


def hold():
    from cke_dist.comm import init
    init().barrier()
    print("up", MPI.COMM_WORLD.rank, flush=True)
    time.sleep(300)


CASES = {"two_hosts": two_hosts, "ring": ring, "stream_threads": stream_threads, "plan": plan,
         "rdma_fails": rdma_fails, "sum": sum_ones, "shm_kill": shm_kill,
         "links": links, "hold": hold}

if __name__ == "__main__":
    CASES[sys.argv[1]](*sys.argv[2:])
