"""Pairwise shm link bench: ping-pong latency and exchange bandwidth between ranks 0 and 1.

    mpiexec -n 2 python bench/shm_link.py [--slot-kib 1024] [--slots 4] [--iters 10]

"exchange" = both ranks send and receive the same size at once (what a ring allreduce step does), reported
per direction; "one-way" = rank 0 streams to rank 1. Median of --iters runs. Reference points measured here:
two Python processes copying through shared memory reach about 5.5 GB/s end to end.
"""
import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from mpi4py import MPI

from cke_dist.comm.shm import connect_shm
from cke_dist.comm.slots import HEADER_BYTES


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slot-kib", type=int, default=1024, help="payload KiB per slot (+ the 64-byte header)")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="small slots, two iterations: checks that it runs")
    args = ap.parse_args()
    if args.smoke:
        args.slot_kib, args.iters = 64, 2
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size != 2:
        raise SystemExit("run with exactly 2 ranks: mpiexec -n 2 python bench/shm_link.py")
    peer = 1 - rank
    links, failed = connect_shm(comm, [peer], [MPI.Get_processor_name()] * 2,
                                nslots=args.slots, slot_bytes=(args.slot_kib << 10) + HEADER_BYTES)
    if failed:
        raise SystemExit(f"shm unavailable: {failed}")
    link = links[peer]
    far = lambda: time.monotonic() + 60  # noqa: E731
    rows = []
    pool = ThreadPoolExecutor(1)  # a persistent send thread, as a collective's comm thread would be
    for nbytes in (8, 4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20):
        a = np.ones(nbytes, np.uint8)
        b = np.empty(nbytes, np.uint8)
        reps = max(1, min(2000, (256 << 20) // max(nbytes, 1) // 8))
        lat, one, exch = [], [], []
        for _ in range(args.iters):
            comm.Barrier()
            t = time.perf_counter()
            for _ in range(reps):
                if rank == 0:
                    link.send(a, 1, far()); link.recv(b, 1, far())
                else:
                    link.recv(b, 1, far()); link.send(a, 1, far())
            lat.append((time.perf_counter() - t) / reps / 2)
            comm.Barrier()
            t = time.perf_counter()
            if rank == 0:
                link.send(a, 2, far()); link.recv(b[:0], 3, far())
            else:
                link.recv(b, 2, far()); link.send(b[:0], 3, far())
            one.append(time.perf_counter() - t)
            comm.Barrier()
            t = time.perf_counter()
            fut = pool.submit(link.send, a, 4, far())
            link.recv(b, 4, far())
            fut.result()
            exch.append(time.perf_counter() - t)
        rows.append((nbytes, np.median(lat), np.median(one), np.median(exch)))
    if rank == 0:
        src, dst = np.ones(64 << 20, np.uint8), np.empty(64 << 20, np.uint8)
        copies = []
        for _ in range(5):
            t = time.perf_counter()
            np.copyto(dst, src)
            copies.append(time.perf_counter() - t)
        print(f"shm link, slots={args.slots} x {args.slot_kib} KiB, median of {args.iters}; "
              f"reference: one np.copyto of 64 MiB in one process = {src.nbytes / np.median(copies) / 1e9:.2f} GB/s")
        print(f"{'bytes':>10} {'half-rtt us':>12} {'one-way GB/s':>13} {'exchange GB/s/dir':>18}")
        for nbytes, lat, one, exch in rows:
            print(f"{nbytes:>10} {lat * 1e6:>12.1f} {nbytes / one / 1e9:>13.2f} {nbytes / exch / 1e9:>18.2f}")
    link.close()


if __name__ == "__main__":
    main()
