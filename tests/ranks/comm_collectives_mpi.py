"""Every collective, op and dtype on however many ranks mpiexec gives (driven at 2..5 by test_comm_mpi.py).

Each rank builds every rank's input from a seed, so the reference is numpy on
the gathered inputs without trusting our own collectives; results are also
compared across ranks through plain MPI (bitwise equal on every rank).
Run by hand: mpiexec -n 3 python -m pytest --with-mpi -q tests/ranks/comm_collectives_mpi.py
"""
import socket
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.mpi(min_size=2)

DTYPES = [np.float32, np.float64, np.int32, np.int64]
OPS = ["sum", "avg", "max", "min", "prod"]


@pytest.fixture(scope="module")
def world():
    from cke_dist.comm import init

    # Short deadline: a broken collective fails this file in seconds, not minutes.
    return init(timeout=30)


@pytest.fixture(scope="module")
def mpi():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def lengths(n):
    # 0, 1, n-1, n+1, primes; recursive doubling below RING_BYTES (1 MiB) and the ring above it
    # (300_007 elements is 1.2 MB at 4 bytes); the driver also reruns all of it with the ring forced
    return sorted({0, 1, max(n - 1, 0), n + 1, 13, 1009, 40_009, 300_007})


def make(rank, length, dtype, op, salt=0):
    rng = np.random.default_rng([rank, length, salt, np.dtype(dtype).num])
    if op == "prod":
        # stays far from overflow for 5 ranks, and exact for ints
        vals = rng.choice([-2, -1, 1, 2], size=length) if np.dtype(dtype).kind == "i" else rng.uniform(0.5, 1.5, length)
    elif np.dtype(dtype).kind == "i":
        vals = rng.integers(-1000, 1000, size=length)
    else:
        vals = rng.standard_normal(length)
    return vals.astype(dtype)


def reference(inputs, op):
    stack = np.stack(inputs)
    if op in ("sum", "avg"):
        # float64 accumulation: the reference is more exact than either order
        out = stack.astype(np.float64).sum(0) if stack.dtype.kind == "f" else stack.sum(0)
        if op == "avg":
            out = out / len(inputs)
        return out
    return {"max": np.max, "min": np.min, "prod": np.prod}[op](stack, axis=0)


def check(result, ref, dtype, op):
    if np.dtype(dtype).kind == "i":
        np.testing.assert_array_equal(result, ref.astype(dtype))
    elif op in ("max", "min"):
        np.testing.assert_array_equal(result, ref)
    else:
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(result, ref, rtol=tol, atol=tol * 10)


def same_everywhere(mpi, arr):
    digests = mpi.allgather(arr.tobytes())
    assert all(d == digests[0] for d in digests), "ranks disagree on the result bits"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", OPS)
def test_allreduce(world, mpi, op, dtype):
    if op == "avg" and np.dtype(dtype).kind == "i":
        with pytest.raises(ValueError, match="avg"):
            world.allreduce(np.zeros(3, dtype), op=op)
        return
    n, me = world.size, world.rank
    for length in lengths(n):
        inputs = [make(r, length, dtype, op) for r in range(n)]
        buf = inputs[me].copy()
        assert world.allreduce(buf, op=op) is buf
        check(buf, reference(inputs, op), dtype, op)
        same_everywhere(mpi, buf)
        # out of place: the input stays as it was, and the bits match the in-place run
        src = inputs[me].copy()
        out = np.empty_like(src)
        world.allreduce(src, op=op, out=out)
        np.testing.assert_array_equal(src, inputs[me])
        np.testing.assert_array_equal(out, buf)


@pytest.mark.parametrize("op", ["sum", "max"])
def test_allreduce_several_mb_deterministic(world, mpi, op):
    n, me = world.size, world.rank
    length = (3 << 20) // 4 + 7  # ~3 MB of float32, not divisible by any rank count here
    inputs = [make(r, length, np.float32, op, salt=7) for r in range(n)]
    first = inputs[me].copy()
    world.allreduce(first, op=op)
    check(first, reference(inputs, op), np.float32, op)
    again = inputs[me].copy()
    world.allreduce(again, op=op)
    np.testing.assert_array_equal(first, again)  # bitwise run to run
    same_everywhere(mpi, first)


def test_allreduce_2d_and_errors(world):
    a = np.full((3, 5), world.rank + 1, np.float64)
    world.allreduce(a)
    assert (a == world.size * (world.size + 1) / 2).all()
    with pytest.raises(ValueError, match="C-contiguous"):
        world.allreduce(np.zeros((4, 4))[:, 1])
    with pytest.raises(TypeError, match="dtype"):
        world.allreduce(np.zeros(3, np.complex64))
    with pytest.raises(ValueError, match="unknown reduction op"):
        world.allreduce(np.zeros(3), op="mean")


@pytest.mark.parametrize("dtype", [np.float32, np.int64], ids=lambda d: np.dtype(d).name)
def test_broadcast(world, dtype):
    n = world.size
    for root in range(n):
        for length in lengths(n):
            want = make(root, length, dtype, "sum", salt=1)
            buf = want.copy() if world.rank == root else np.zeros(length, dtype)
            assert world.broadcast(buf, root=root) is buf
            np.testing.assert_array_equal(buf, want)


@pytest.mark.parametrize("dtype", [np.float64, np.int32], ids=lambda d: np.dtype(d).name)
def test_allgather(world, dtype):
    n = world.size
    for length in lengths(n):
        inputs = [make(r, length, dtype, "sum", salt=2) for r in range(n)]
        recv = np.full(n * length, -7, dtype)
        world.allgather(inputs[world.rank], recv)
        np.testing.assert_array_equal(recv, np.concatenate(inputs))


@pytest.mark.parametrize("op", OPS)
def test_reduce_scatter(world, op):
    n, me = world.size, world.rank
    for m in (0, 1, 7, 20_011):
        inputs = [make(r, n * m, np.float64, op, salt=3) for r in range(n)]
        send = inputs[me].copy()
        recv = np.empty(m, np.float64)
        world.reduce_scatter(send, recv, op=op)
        np.testing.assert_array_equal(send, inputs[me])
        check(recv, reference(inputs, op)[me * m:(me + 1) * m], np.float64, op)


def test_send_recv_ring(world):
    n, me = world.size, world.rank
    for length in (0, 1, 1000, 300_007):
        out = make(me, length, np.float32, "sum", salt=4)
        got = np.empty(length, np.float32)
        right, left = (me + 1) % n, (me - 1) % n
        # even ranks send first: blocking send/recv pairs need an order, as in MPI (with an odd
        # count, rank n-1 and rank 0 both send first; rank 0's send drains, then it receives)
        if me % 2 == 0:
            world.send(out, right, tag=5)
            world.recv(got, left, tag=5)
        else:
            world.recv(got, left, tag=5)
            world.send(out, right, tag=5)
        np.testing.assert_array_equal(got, make(left, length, np.float32, "sum", salt=4))
        with pytest.raises(ValueError, match="not another rank"):
            world.send(out, me)


def test_async_send_then_recv_both_ways(world, mpi):
    """Both ranks of each pair post a large async send, then receive: must not deadlock on full
    socket buffers (the pipeline's exchange), and a collective after it sees consistent links."""
    n, me = world.size, world.rank
    peer = me ^ 1
    if peer < n:
        length = 3_000_017  # 12 MB: far beyond what socket buffers hold
        out = make(me, length, np.float32, "sum", salt=6)
        got = np.empty(length, np.float32)
        hs = [world.send(out, peer, tag=9, async_op=True)]
        hs.append(world.recv(got, peer, tag=9, async_op=True))
        small = np.full(3, float(me), np.float64)
        hs.append(world.send(small, peer, tag=10, async_op=True))
        back = np.empty(3, np.float64)
        world.recv(back, peer, tag=10)  # sync, queued behind the async ones
        for h in hs:
            h.wait(timeout=60)
        np.testing.assert_array_equal(got, make(peer, length, np.float32, "sum", salt=6))
        assert (back == peer).all()
    x = np.ones(5)
    world.allreduce(x)
    assert (x == n).all()


def test_barrier(world, mpi):
    for _ in range(20):
        world.barrier()
    mpi.Barrier()


def test_async_handles_in_order(world):
    n = world.size
    bufs = [np.full(50_000 + i, float(world.rank + i), np.float32) for i in range(5)]
    handles = [world.allreduce(b, op="avg", async_op=True) for b in bufs]
    sync = np.full(10, 1.0)
    world.allreduce(sync)  # queued behind the async ones, on every rank in the same order
    for i, (b, h) in enumerate(zip(bufs, handles)):
        assert h.wait(timeout=60) is b
        assert h.is_completed()
        np.testing.assert_allclose(b, (n - 1) / 2 + i, rtol=1e-6)
    assert (sync == n).all()


def test_split_groups(world, mpi):
    n, me = world.size, world.rank
    evens = world.split(list(range(0, n, 2)))
    odds = world.split(list(range(1, n, 2)))
    mine = evens if me % 2 == 0 else odds
    assert (evens is None) == (me % 2 == 1) and (odds is None) == (me % 2 == 0)
    assert mine.ranks == tuple(range(me % 2, n, 2)) and mine.rank == me // 2
    # two disjoint groups at the same time, many ops each, plus a world op sharing their links
    for rep in range(10):
        a = np.full(30_000 + rep, float(me), np.float64)
        h = world.allreduce(np.full(4, 1.0), async_op=True)
        mine.allreduce(a)
        assert (a == sum(mine.ranks)).all()
        assert (h.wait() == n).all()
    # a group in reversed order: group rank 0 is the last world rank
    rev = world.split(list(reversed(range(n))))
    assert rev.rank == n - 1 - me
    b = np.arange(5.0) if rev.rank == 0 else np.zeros(5)
    rev.broadcast(b, root=0)
    assert (b == np.arange(5.0)).all()
    # a sub-group of a sub-group, in the parent's numbering
    pair = world.split([0, n - 1])
    if pair is not None:
        sub = pair.split([1, 0])
        v = np.array([float(me)])
        sub.allreduce(v, op="max")
        assert v[0] == n - 1
    mpi.Barrier()


def test_stray_connection_refused_while_allreduce_runs(world, mpi):
    n, me = world.size, world.rank
    target = world.facts[(me + 1) % n]["tcp"]
    before = world._listener.rejected
    mpi.Barrier()  # read the counter before any stray is sent
    closed = {}

    def stray():
        with socket.create_connection(tuple(target), timeout=10) as s:
            s.sendall(b"CKEH" + b"\x00" * 16 + (1).to_bytes(4, "little") + n.to_bytes(4, "little") + bytes(4))
            closed["eof"] = s.recv(100) == b""

    t = threading.Thread(target=stray)
    t.start()
    for i in range(30):
        x = np.full(1000 + 97 * i, float(me + i), np.float32)
        world.allreduce(x)
        assert (x == sum(range(n)) + n * i).all()
    t.join(10)
    assert closed.get("eof"), "the stray connection was not closed by the listener"
    mpi.Barrier()  # every stray has been handled before anyone reads its counter
    assert world._listener.rejected == before + 1


def test_soak_random_sizes(world, mpi):
    n, me = world.size, world.rank
    rng = np.random.default_rng(1234)  # same sizes on every rank
    sizes = rng.integers(0, 200_000, size=300) // rng.choice([1, 10, 1000], size=300)
    for i, length in enumerate(sizes):
        x = np.arange(length, dtype=np.int64) * (me + 1) + i
        world.allreduce(x)
        np.testing.assert_array_equal(x, np.arange(length, dtype=np.int64) * (n * (n + 1) // 2) + n * i)
