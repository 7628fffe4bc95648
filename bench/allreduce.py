"""Allreduce benchmark: ours vs mpi4py's MPI Allreduce vs torch.distributed gloo, in one run.

    mpiexec -n 2 python bench/allreduce.py                 # the table (4 KiB .. 64 MiB float32)
    mpiexec -n 2 python bench/allreduce.py --algos         # ring vs recursive doubling, to place RING_BYTES
    mpiexec -n 2 python bench/allreduce.py --sizes 4K,1M --no-gloo --transport tcp
    mpiexec -n 2 python bench/allreduce.py --transport shm     # the shm row of issue 4
    mpiexec -n 4 python bench/allreduce.py --hosts 2           # "mixed": 2 posed hosts, shm inside, tcp across

Every call starts after an MPI barrier; its time is the slowest rank's; the
contenders take turns within each rep so load from elsewhere hits them alike;
the table shows medians, algorithm bandwidth (bytes / time), bus bandwidth
(2(n-1)/n * bytes / time) and our time relative to each peer (ratio < 1: we
are faster). All three reduce the same zero-filled float32 buffer in place,
with one thread per rank. These machines are noisy: read the ratios.

--hosts K poses the ranks as K hosts (consecutive blocks of ranks) through the
test-only CKE_COMM_HOSTNAME, over loopback (CKE_COMM_INTERFACE=lo unless set),
so `auto` picks shm inside a posed host and tcp across: the "mixed" row. MPI
and gloo still see one host, so there the ratios compare our mixed transport
with their shared memory.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402
from gloo_peer import setup_gloo  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from mpi4py import MPI  # noqa: E402

SIZES = "4K,64K,1M,16M,64M"
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("IB").removesuffix("B")
    if s and s[-1] in UNITS:
        return int(float(s[:-1]) * UNITS[s[-1]])
    return int(s)


def label(nbytes: int) -> str:
    for unit in ("G", "M", "K"):
        if nbytes >= UNITS[unit] and nbytes % UNITS[unit] == 0:
            return f"{nbytes // UNITS[unit]} {unit}iB"
    return f"{nbytes} B"


def reps_for(budget_s: float, first_s: float) -> int:
    return int(max(5, min(200, budget_s / max(first_s, 1e-6))))


def timed_together(comm, fns: dict, budget_s):
    """{name: median over reps of the slowest rank's time for one call}.

    The contenders take turns within every rep, so a burst of load from other
    jobs on the machine hits all of them alike and the ratios stay fair.
    """
    first = {}
    for name, fn in fns.items():
        fn()  # warm-up: connections, scratch buffers, page faults
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        first[name] = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    reps = reps_for(budget_s, sum(first.values()))
    times = np.empty((reps, len(fns)))
    for i in range(reps):
        for j, fn in enumerate(fns.values()):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            times[i, j] = time.perf_counter() - t0
    slowest = np.empty_like(times)
    comm.Allreduce(times, slowest, op=MPI.MAX)
    return {name: float(np.median(slowest[:, j])) for j, name in enumerate(fns)}


def pose_hosts(k: int) -> None:
    """Give rank r the host name <real>-host<r * k // size> (before init), talking over loopback."""
    comm = MPI.COMM_WORLD
    if not 1 <= k <= comm.size:
        raise SystemExit(f"--hosts {k}: need 1..{comm.size} (the number of ranks)")
    os.environ["CKE_COMM_HOSTNAME"] = f"{socket.gethostname()}-host{comm.rank * k // comm.size}"
    os.environ.setdefault("CKE_COMM_INTERFACE", "lo")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=SIZES, help=f"comma list of buffer sizes (default {SIZES})")
    ap.add_argument("--transport", default=None, help="our transport: auto|tcp|shm|rdma (default: CKE_TRANSPORT or auto)")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of reps per size (all contenders)")
    ap.add_argument("--no-gloo", action="store_true", help="leave torch gloo out")
    ap.add_argument("--algos", action="store_true", help="ring vs recursive doubling instead of the table")
    ap.add_argument("--hosts", type=int, default=None,
                    help="pose the ranks as this many hosts (shm inside, tcp across: the mixed row)")
    ap.add_argument("--smoke", action="store_true", help="two small sizes, a short budget, no gloo: checks it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.budget, args.no_gloo = "4K,256K", 0.2, True
    if args.hosts is not None:
        pose_hosts(args.hosts)

    from cke_dist.comm import collectives, init

    comm = MPI.COMM_WORLD
    world = init(transport=args.transport)
    n = world.size
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    root = comm.rank == 0
    kinds = sorted({link.kind for link in world.links.values()}) or ["none"]

    if args.algos:
        sizes = [parse_size(s) for s in "4K,16K,32K,64K,128K,256K,512K,1M,4M".split(",")] \
            if args.sizes == SIZES else sizes
        if root:
            print(f"# ring vs recursive doubling, {n} ranks, transport {'+'.join(kinds)}; median us")
            print(f"{'size':>10} {'rec.doubling':>13} {'ring':>10} {'faster':>8}")
        for nb in sizes:
            buf = np.zeros(nb // 4, np.float32)
            t = timed_together(comm, {
                "rd": lambda: world._run("allreduce", lambda: collectives.rd_allreduce(
                    world, buf, "sum", world._tag(1)), False),
                "ring": lambda: world._run("allreduce", lambda: collectives.ring_allreduce(
                    world, buf, "sum", world._tag(1)), False)}, args.budget)
            t_rd, t_ring = t["rd"], t["ring"]
            if root:
                print(f"{label(nb):>10} {t_rd * 1e6:13.1f} {t_ring * 1e6:10.1f} "
                      f"{'rd' if t_rd < t_ring else 'ring':>8}", flush=True)
        return 0

    gloo = None if args.no_gloo else setup_gloo(comm)
    bus = 2 * (n - 1) / n if n > 1 else 1.0
    rows = []
    for nb in sizes:
        buf = np.zeros(nb // 4, np.float32)
        fns = {"ours": lambda: world.allreduce(buf),
               "mpi": lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)}
        if gloo:
            torch, dist = gloo
            t = torch.from_numpy(buf)
            fns["gloo"] = lambda: dist.all_reduce(t)
        row = timed_together(comm, fns, args.budget)
        row["bytes"] = nb
        rows.append(row)
        if root:
            print(f"# {label(nb)} done", file=sys.stderr, flush=True)
    if gloo:
        gloo[1].destroy_process_group()

    if root:
        lib = MPI.Get_library_version().splitlines()[0].strip()
        posed = " (posed)" if args.hosts is not None else ""
        print(f"# allreduce float32 sum, {n} ranks on {len(set(world.hosts))} host(s){posed}, "
              f"ours over {'+'.join(kinds)}; {lib}; medians")
        peers = ["mpi"] + (["gloo"] if gloo else [])
        head = f"{'size':>9} |"
        for who in ["ours"] + peers:
            head += f" {who + ' time':>12} {'algbw':>7} {'busbw':>7} |"
        head += "".join(f" {'ours/' + p:>9}" for p in peers)
        print(head)
        print(f"{'':>9} |" + f" {'':>12} {'GB/s':>7} {'GB/s':>7} |" * (1 + len(peers)))
        for row in rows:
            nb = row["bytes"]
            line = f"{label(nb):>9} |"
            for who in ["ours"] + peers:
                t = row[who]
                line += f" {fmt_time(t):>12} {nb / t / 1e9:7.3f} {bus * nb / t / 1e9:7.3f} |"
            line += "".join(f" {row['ours'] / row[p]:9.2f}" for p in peers)
            print(line, flush=True)
        print("# ratio = our time / their time: below 1.00 we are faster")
    return 0


def fmt_time(t):
    return f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


if __name__ == "__main__":
    sys.exit(main())
