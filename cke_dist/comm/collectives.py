"""Collectives written once over `Link`: allreduce, broadcast, barrier, allgather, reduce_scatter.

Rules these keep:
- Only `Link.send`/`recv`/`recv_reduce` move data; nothing here knows TCP, shm or RDMA.
- Fixed reduction order: every element's result depends on the group layout
  and the buffer length only (ring for large buffers, recursive doubling for
  small ones, same switch on every rank), so runs are bitwise repeatable and
  every rank ends with the same bits.
- A step that sends and receives at once hands the send to the context's send
  thread unless it fits `link.eager_bytes`, so no step waits on a full buffer.
- Buffers are flat, contiguous, already validated (see reduce_ops.check_buffer);
  user data is only written after a frame has been checked by the link.
Tests: tests/ranks/comm_collectives_mpi.py (1..5 ranks), tests/unit/test_comm_single.py.

`ctx` is the calling group (group.Communicator): `rank`, `size`, `link(r)`,
`deadline()`, `post(link, [memoryview], tag)` -> handle with `wait()`, and
`scratch(nbytes)` -> a reusable uint8 array.
"""
from __future__ import annotations

import os

import numpy as np

from cke_dist.comm.reduce_ops import combine, finish

# Allreduce of buffers of at least this many bytes uses the ring, below it
# recursive doubling. Measured, not guessed: `mpiexec -n N python
# bench/allreduce.py --algos` forces each algorithm over 4 KiB..4 MiB (medians,
# loopback TCP, 2 shared cores, 2026-11-25). Recursive doubling won every size
# up to 512 KiB at N = 2, 3 and 4 (e.g. N=3: 64 KiB 159 us vs 666 us, 512 KiB
# 0.67 ms vs 0.85 ms); from 1 MiB the two were within the noise (N=3 1 MiB:
# ring 1.6 ms vs 2.4 ms; N=2 4 MiB: 4.0 vs 4.3 ms). The ring moves 2(n-1)/n of
# the buffer per rank against log2(n) (+2 folds when n is not a power of two)
# for recursive doubling, so it wins at large sizes on more ranks; 1 MiB is the
# switch. Override with CKE_ALLREDUCE_RING_BYTES; rerun --algos on new hardware.
RING_BYTES = int(os.environ.get("CKE_ALLREDUCE_RING_BYTES", 1 << 20))
# Ring steps move a segment as messages of this size so the reduction of one
# chunk overlaps the arrival of the next.
CHUNK_BYTES = int(os.environ.get("CKE_RING_CHUNK_BYTES", 1 << 20))


def _mv(a: np.ndarray) -> memoryview:
    return memoryview(a).cast("B")


def _exchange(ctx, dst, send_arr, src, recv_arr, tag):
    """Send `send_arr` to group rank `dst` while receiving `recv_arr` from `src`."""
    out_link, in_link = ctx.link(dst), ctx.link(src)
    if out_link.eager_bytes and send_arr.nbytes <= out_link.eager_bytes:
        out_link.send(_mv(send_arr), tag, ctx.deadline())
        in_link.recv(_mv(recv_arr), tag, ctx.deadline())
        return
    h = ctx.post(out_link, [_mv(send_arr)], tag)
    _recv_then_wait(h, lambda: in_link.recv(_mv(recv_arr), tag, ctx.deadline()))


def _recv_then_wait(h, receive):
    """Run `receive`, then wait for the posted send `h`; the receive's error wins over the send's."""
    try:
        receive()
    except BaseException:
        try:
            h.wait()  # the send thread must be done with the buffer before we unwind
        except BaseException:
            pass
        raise
    h.wait()


class _Done:
    @staticmethod
    def wait():
        return None


_DONE = _Done()


def _segments(length, n):
    """Element offsets of n nearly equal segments covering `length` (the first length % n one longer)."""
    base, extra = divmod(length, n)
    offs = [0]
    for i in range(n):
        offs.append(offs[-1] + base + (1 if i < extra else 0))
    return offs


def _chunks(lo, hi, step):
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)] or [(lo, hi)]


# ---------------------------------------------------------------- allreduce
def allreduce(ctx, buf: np.ndarray, op: str, tag: int) -> None:
    """In place over the flat `buf`: every rank ends with op over all ranks' buffers."""
    n = ctx.size
    if n == 1 or buf.size == 0:
        return
    if buf.nbytes >= RING_BYTES and buf.size >= n:
        ring_allreduce(ctx, buf, op, tag)
    else:
        rd_allreduce(ctx, buf, op, tag)


def rd_allreduce(ctx, buf, op, tag):
    """Recursive doubling; the n - 2^k extra ranks fold into a partner first (MPICH's scheme)."""
    n, me = ctx.size, ctx.rank
    tmp = ctx.scratch(buf.nbytes).view(buf.dtype)[: buf.size]
    pof2 = 1 << (n.bit_length() - 1)
    rem = n - pof2
    # Ranks < 2*rem pair up (even, odd); the even one hands its data over and sits out.
    if me < 2 * rem:
        if me % 2 == 0:
            ctx.link(me + 1).send(_mv(buf), tag, ctx.deadline())
            vme = -1
        else:
            ctx.link(me - 1).recv(_mv(tmp), tag, ctx.deadline())
            combine(op, tmp, buf, buf)
            vme = me // 2
    else:
        vme = me - rem
    if vme >= 0:
        mask = 1
        while mask < pof2:
            vpeer = vme ^ mask
            peer = vpeer * 2 + 1 if vpeer < rem else vpeer + rem
            _exchange(ctx, peer, buf, peer, tmp, tag)
            if peer < me:
                combine(op, tmp, buf, buf)
            else:
                combine(op, buf, tmp, buf)
            mask <<= 1
    if me < 2 * rem:
        if me % 2 == 0:
            ctx.link(me + 1).recv(_mv(buf), tag, ctx.deadline())
        else:
            ctx.link(me - 1).send(_mv(buf), tag, ctx.deadline())
    finish(op, buf, n)


def _ring_reduce_scatter(ctx, buf, op, tag, offs):
    """After n-1 steps rank r holds segment r reduced over all ranks (in buf[offs[r]:offs[r+1]])."""
    n, me = ctx.size, ctx.rank
    right, left = (me + 1) % n, (me - 1) % n
    step = max(1, CHUNK_BYTES // buf.itemsize)
    out_link, in_link = ctx.link(right), ctx.link(left)
    for s in range(n - 1):
        si, ri = (me - s - 1) % n, (me - s - 2) % n
        sends = [_mv(buf[a:b]) for a, b in _chunks(offs[si], offs[si + 1], step)]
        # one message that fits the peer's buffer: send it inline, skipping the thread hop. Several
        # chunks (CKE_RING_CHUNK_BYTES below the eager size) take the send thread: each would hold a
        # slot of the peer's ring, and both neighbours sending before receiving could fill it.
        if len(sends) == 1 and out_link.eager_bytes and sends[0].nbytes <= out_link.eager_bytes:
            out_link.send(sends[0], tag, ctx.deadline())
            h = _DONE
        else:
            h = ctx.post(out_link, sends, tag)

        def receive():
            # straight into buf, no staging copy (slot links reduce from slot memory); the left neighbour's
            # partial sum is the first operand, as everywhere in the ring
            for a, b in _chunks(offs[ri], offs[ri + 1], step):
                in_link.recv_reduce(buf[a:b], tag, ctx.deadline(), op)
        _recv_then_wait(h, receive)


def _ring_allgather(ctx, buf, tag, offs):
    """Rank r starts owning segment r; after n-1 steps every rank has every segment."""
    n, me = ctx.size, ctx.rank
    right, left = (me + 1) % n, (me - 1) % n
    for s in range(n - 1):
        si, ri = (me - s) % n, (me - s - 1) % n
        _exchange(ctx, right, buf[offs[si]:offs[si + 1]], left, buf[offs[ri]:offs[ri + 1]], tag)


def ring_allreduce(ctx, buf, op, tag):
    """Ring reduce-scatter then ring allgather: 2(n-1)/n of the buffer crosses each link."""
    offs = _segments(buf.size, ctx.size)
    _ring_reduce_scatter(ctx, buf, op, tag, offs)
    me = ctx.rank
    finish(op, buf[offs[me]:offs[me + 1]], ctx.size)
    _ring_allgather(ctx, buf, tag, offs)


# ------------------------------------------------------- other collectives
def reduce_scatter(ctx, send, recv, op, tag):
    """recv on rank r = op over ranks of send[r*m:(r+1)*m], m = recv.size."""
    n, m = ctx.size, recv.size
    if n == 1 or m == 0:
        np.copyto(recv, send)
        finish(op, recv, n)
        return
    work = send.copy()  # the ring accumulates in place; the caller's send buffer stays untouched
    offs = [i * m for i in range(n + 1)]
    _ring_reduce_scatter(ctx, work, op, tag, offs)
    np.copyto(recv, work[offs[ctx.rank]:offs[ctx.rank + 1]])
    finish(op, recv, n)


def allgather(ctx, send, recv, tag):
    """recv = concatenation of every rank's send, in group rank order."""
    n, m = ctx.size, send.size
    offs = [i * m for i in range(n + 1)]
    np.copyto(recv[offs[ctx.rank]:offs[ctx.rank + 1]], send)
    if n > 1 and m > 0:
        _ring_allgather(ctx, recv, tag, offs)


def broadcast(ctx, buf, root, tag):
    """Binomial tree from `root`: log2(n) rounds."""
    n = ctx.size
    if n == 1:
        return
    vr = (ctx.rank - root) % n
    mask = 1
    while mask < n:
        if vr & mask:
            ctx.link((vr - mask + root) % n).recv(_mv(buf), tag, ctx.deadline())
            break
        mask <<= 1
    mask >>= 1
    while mask > 0:
        if vr + mask < n:
            ctx.link((vr + mask + root) % n).send(_mv(buf), tag, ctx.deadline())
        mask >>= 1


def barrier(ctx, tag):
    """Dissemination barrier: round k signals rank+2^k and waits for rank-2^k."""
    n, me = ctx.size, ctx.rank
    out, inb = np.zeros(0, np.uint8), np.zeros(0, np.uint8)
    k = 1
    while k < n:
        _exchange(ctx, (me + k) % n, out, (me - k) % n, inb, tag)
        k <<= 1
