"""Comm-level jobs the chaos tests (tests/cluster/test_chaos.py) run on the virtual cluster.

    python tests/ranks/comm_chaos_mpi.py stray DIR     # seeded collectives while outsiders hit the listening ports
    python tests/ranks/comm_chaos_mpi.py soak N SEED   # N random collectives checked against numpy
    python tests/ranks/comm_chaos_mpi.py slow          # large transfers over a link slowed to a crawl
    python tests/ranks/comm_chaos_mpi.py hold DIR      # rank 1 in a barrier under an hour's deadline, rank 0 busy

Each prints one line per rank that the test reads ("rank R: ...").
"""
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
from comm_collectives_mpi import check, make, reference

from cke_dist.comm import CommError, init


def wait_for(path: Path, limit=120.0):
    t = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > t:
            raise SystemExit(f"{path} did not appear within {limit}s")
        time.sleep(0.02)


def stray(d: Path):
    """Write this rank's endpoint, wait for DIR/go, run a fixed seeded series of collectives and hash every result,
    then stay up until DIR/done (the attack is over) and report the digest and the listener's refusals."""
    world = init()
    n, me = world.size, world.rank
    host, port = world.facts[me]["tcp"]
    (d / f"ep.{me}").write_text(f"{host} {port}\n")
    wait_for(d / "go")
    h = hashlib.sha256()
    for i in range(40):
        for length, dtype in ((1000 + i, np.float32), (300_007, np.float32), (20_011, np.int64)):
            x = make(me, length, dtype, "sum", salt=i)
            world.allreduce(x)
            h.update(x.tobytes())
        b = make(i % n, 50_000, np.float64, "sum", salt=i) if me == i % n else np.zeros(50_000)
        world.broadcast(b, root=i % n)
        g = np.empty(n * 7001, np.float32)
        world.allgather(make(me, 7001, np.float32, "sum", salt=i), g)
        r = np.empty(4099, np.float64)
        world.reduce_scatter(make(me, n * 4099, np.float64, "max", salt=i), r, op="max")
        for a in (b, g, r):
            h.update(a.tobytes())
    wait_for(d / "done")
    world.barrier()
    print(f"rank {me}: digest {h.hexdigest()} rejected {world._listener.rejected}", flush=True)


def soak(count: int, seed: int):
    """`count` random collectives (op, dtype, length 0..4M elements, group, root) against numpy on every member's
    input (each rank rebuilds all inputs from seeds, so the reference trusts nothing under test)."""
    from mpi4py import MPI

    world = init()
    n, me = world.size, world.rank
    member_lists = [list(range(n)), list(reversed(range(n)))] + [[a, b] for a in range(n) for b in range(a + 1, n)]
    if n > 2:
        member_lists += [list(range(1, n)), list(range(0, n, 2))]
    groups = [world.split(m) for m in member_lists]
    rng = np.random.default_rng(seed)       # the same draws on every rank
    kinds = ["allreduce", "allreduce", "broadcast", "allgather", "reduce_scatter", "sendrecv"]
    dtypes = [np.float32, np.float64, np.int32, np.int64]
    wrong, counts, moved = [], {}, 0
    for i in range(count):
        kind = kinds[rng.integers(len(kinds))]
        dtype = dtypes[rng.integers(len(dtypes))]
        ops = ["sum", "max", "min", "prod"] + (["avg"] if np.dtype(dtype).kind == "f" else [])
        op = ops[rng.integers(len(ops))]
        gi = int(rng.integers(len(groups)))
        members = member_lists[gi]
        length = int(np.exp(rng.uniform(0, np.log(4 * 2**20 + 1)))) - 1     # log-uniform over 0..4M elements
        root = int(rng.integers(len(members)))
        if kind in ("allgather", "reduce_scatter"):
            length //= len(members)   # keeps the gathered / scattered whole within 4M elements
        if kind == "sendrecv" and len(members) < 2:
            continue
        counts[kind] = counts.get(kind, 0) + 1
        g = groups[gi]
        if g is None:
            continue
        ins = [make(m, length, dtype, op, salt=i) for m in members]
        try:
            if kind == "allreduce":
                got = ins[g.rank].copy()
                g.allreduce(got, op=op)
                check(got, reference(ins, op), dtype, op)
            elif kind == "broadcast":
                got = ins[root].copy() if g.rank == root else np.zeros(length, dtype)
                g.broadcast(got, root=root)
                np.testing.assert_array_equal(got, ins[root])
            elif kind == "allgather":
                got = np.empty(len(members) * length, dtype)
                g.allgather(ins[g.rank], got)
                np.testing.assert_array_equal(got, np.concatenate(ins))
            elif kind == "reduce_scatter":
                full = [make(m, len(members) * length, dtype, op, salt=i) for m in members]
                got = np.empty(length, dtype)
                g.reduce_scatter(full[g.rank], got, op=op)
                check(got, reference(full, op)[g.rank * length:(g.rank + 1) * length], dtype, op)
            else:  # group rank 0 sends to the root (or to 1 when the root is 0), the rest of the group idles
                dst = root if root else 1
                if g.rank == 0:
                    g.send(ins[0], dst, tag=i & 0xFFFF)
                elif g.rank == dst:
                    got = np.empty(length, dtype)
                    g.recv(got, 0, tag=i & 0xFFFF)
                    np.testing.assert_array_equal(got, ins[0])
            moved += length * np.dtype(dtype).itemsize
        except AssertionError as e:
            wrong.append(f"#{i} {kind} {op} {np.dtype(dtype).name} length {length} group {members} root {root}: "
                         f"{str(e)[:300]}")
    all_wrong = MPI.COMM_WORLD.gather(wrong, root=0)
    total = MPI.COMM_WORLD.reduce(moved, root=0)
    if me == 0:
        flat = [w for ws in all_wrong for w in ws]
        print(f"rank 0: soak {count} collectives {sorted(counts.items())} {total / 2**30:.2f} GiB checked, "
              f"{len(flat)} wrong", flush=True)
        for w in flat[:20]:
            print(f"WRONG {w}", flush=True)


def slow():
    """Rank 0 sends rank 1 one 4 MiB message, then both allreduce 2 MiB: each takes several comm deadlines over the
    slowed link but keeps moving, so neither may fail."""
    world = init()
    me = world.rank
    data = make(0, 1 << 20, np.float32, "sum", salt=99)   # 4 MiB
    t0 = time.monotonic()
    if me == 0:
        world.send(data, 1, tag=1)
        world.recv(np.empty(1, np.float32), 1, tag=2)      # rank 1's receipt: the send is done when this arrives
    else:
        got = np.empty_like(data)
        world.recv(got, 0, tag=1)
        assert np.array_equal(got, data), "the slow message arrived corrupted"
        world.send(np.ones(1, np.float32), 0, tag=2)
    t_send = time.monotonic() - t0
    ins = [make(r, 1 << 19, np.float32, "sum", salt=7) for r in range(2)]
    x = ins[me].copy()
    t0 = time.monotonic()
    world.allreduce(x)
    t_ar = time.monotonic() - t0
    check(x, reference(ins, "sum"), np.float32, "sum")
    print(f"rank {me}: slow ok send {t_send:.2f}s allreduce {t_ar:.2f}s timeout {world.timeout}", flush=True)


def hold(d: Path):
    """Rank 0 stays busy (as if writing a checkpoint) for HOLD_S seconds, then joins the barrier; rank 1 waits in
    the barrier under an hour's deadline. With h0's cable pulled, rank 1 must still fail within the comm timeout."""
    world = init()
    x = np.ones(10, np.float32)
    world.allreduce(x)
    if world.rank == 0:
        (d / "ready").write_text("1")
        time.sleep(float(os.environ["HOLD_S"]))
    t0 = time.monotonic()
    try:
        world.barrier(timeout=3600)
    except CommError as e:
        print(f"rank {world.rank}: barrier failed after {time.monotonic() - t0:.2f}s: {e}", flush=True)
        raise
    print(f"rank {world.rank}: barrier ok after {time.monotonic() - t0:.2f}s", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "stray":
        stray(Path(sys.argv[2]))
    elif mode == "soak":
        soak(int(sys.argv[2]), int(sys.argv[3]))
    elif mode == "slow":
        slow()
    elif mode == "hold":
        hold(Path(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
