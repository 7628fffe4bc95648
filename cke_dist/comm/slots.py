"""The slot protocol shared by the `shm` and `rdma` links: one place for chunking, ordering, tags and credits.

A direction of a link is a ring of `nslots` fixed-size slots in memory the receiver reads. The sender writes a
chunk (a 64-byte header + up to `slot_bytes - 64` payload bytes) into slot `seq % nslots`, then *publishes* it;
the receiver validates the header, copies the payload out and *releases* the slot, which returns one credit.
The sender never has more than `nslots` chunks unreleased, so it never overwrites a slot still being read.

Rules kept here (the backends only say how to publish, release and wait):
- One message = ceil(len / payload) chunks, at least one (a 0-byte message still carries its header).
- Every chunk header carries (seq, tag, total length, offset, nbytes). The receiver checks the sequence number
  (ordering, nothing lost), then tag and total length against what it expects *before* copying anything, and
  never writes outside the user's buffer.
- A message whose tag or length differs is consumed and discarded (so the link stays in step), then FrameError
  names expected and found values. A header that breaks the sequence means the ring is corrupt: the link is marked
  broken and every later call raises.
- recv_reduce reduces each chunk straight from its slot into the user's buffer (numpy ufunc, GIL released) and
  releases the slot afterwards: one pass over the data instead of copy-out + reduce.
- Payload copies go straight between the user's buffer and the slot (memoryview assignment when small, np.copyto
  -- memcpy speed, GIL released -- when large); no Python bytes objects, no staging copy.
- Waiting (spin, then block or back off) belongs to the backend: shm blocks on a futex, rdma polls its CQ.
- Deadlines measure lack of progress (as in tcp): the time left when a send or receive of several chunks starts
  is its budget, and each chunk that moves restarts it.
Covered by tests/integration/test_shm_link.py and tests/ranks/shm_link_mpi.py (through ShmLink, with real processes).
"""
from __future__ import annotations

import abc
import struct
import time
from typing import Callable

import numpy as np

from cke_dist.comm.errors import CommError, FrameError
from cke_dist.comm.reduce_ops import combine
from cke_dist.comm.transport import Link

HEADER = struct.Struct("<QqQQQ")  # seq, tag, total, offset, nbytes
HEADER_BYTES = 64  # header padded to a cache line so payload copies start aligned


class TxRing(abc.ABC):
    """The sender's end of one direction: where chunks are staged and how they are published."""

    nslots: int
    slot_bytes: int

    @abc.abstractmethod
    def slot(self, i: int) -> np.ndarray:
        """Writable uint8 view (slot_bytes long) where the chunk for slot i is staged."""

    @abc.abstractmethod
    def released(self) -> int:
        """How many chunks the receiver has released so far (a monotone count)."""

    @abc.abstractmethod
    def publish(self, i: int, seq: int, nbytes: int) -> None:
        """Make the first nbytes of slot i (chunk number seq) visible to the receiver."""

    @abc.abstractmethod
    def wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        """Return once ready() is true; raise CommTimeout past deadline, PeerLost if the peer is gone."""


class RxRing(abc.ABC):
    """The receiver's end of one direction."""

    nslots: int
    slot_bytes: int

    @abc.abstractmethod
    def published(self) -> int:
        """How many chunks the sender has published so far (a monotone count)."""

    @abc.abstractmethod
    def slot(self, i: int) -> np.ndarray:
        """Readable uint8 view of slot i in the receiver's memory."""

    @abc.abstractmethod
    def release(self, count: int) -> None:
        """Tell the sender that chunks [0, count) are consumed: their slots may be reused."""

    @abc.abstractmethod
    def wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        """As TxRing.wait."""


# Copies below this size go through memoryview slice assignment (a memcpy with the GIL held, ~0.2 us of
# overhead); larger ones through np.copyto, which releases the GIL so the other direction's thread can copy too.
SMALL_COPY = 64 << 10


def _as_bytes(buf) -> memoryview:
    """A flat byte view of a contiguous buffer (no copy)."""
    if isinstance(buf, memoryview) and buf.ndim == 1 and buf.format == "B":
        return buf
    return memoryview(buf).cast("B")


class _End:
    def __init__(self, ring, peer: int, host: str, kind: str):
        if ring.slot_bytes <= HEADER_BYTES:
            raise ValueError(f"slot_bytes={ring.slot_bytes} must exceed the {HEADER_BYTES}-byte header")
        self.ring = ring
        self.payload = ring.slot_bytes - HEADER_BYTES
        self.seq = 0  # next chunk number
        self.peer, self.host, self.kind = peer, host, kind
        self.broken: str | None = None
        self.slots_np = [ring.slot(i) for i in range(ring.nslots)]  # fixed for the ring's life: look up once
        self.slots_mv = [memoryview(a) for a in self.slots_np]

    def _check(self, op: str):
        if self.broken is not None:
            raise CommError(f"{self.kind} link is unusable after an earlier error: {self.broken}",
                            op=op, peer=self.peer, host=self.host)

    def nchunks(self, total: int) -> int:
        return max(1, -(-total // self.payload))


class SlotSender(_End):
    """Sends whole messages through a TxRing. One sender per direction; calls are serialised by the caller."""

    def send(self, buf, tag: int, deadline: float) -> None:
        if self.broken is not None:
            self._check("send")
        src = _as_bytes(buf)
        total = len(src)
        src_np = np.frombuffer(src, np.uint8) if total > SMALL_COPY else None
        ring, nslots, payload = self.ring, self.ring.nslots, self.payload
        off = 0
        nchunks = self.nchunks(total)
        budget = deadline - time.monotonic() if nchunks > 1 else 0.0   # time allowed without progress
        try:
            for k in range(nchunks):
                if k:  # a chunk went out: the deadline counts from there
                    deadline = time.monotonic() + budget
                seq = self.seq
                if seq - ring.released() >= nslots:
                    ring.wait(lambda: seq - ring.released() < nslots, deadline, "send (waiting for a free slot)")
                i = seq % nslots
                n = min(payload, total - off)
                HEADER.pack_into(self.slots_mv[i], 0, seq, tag, total, off, n)
                if src_np is None:
                    self.slots_mv[i][HEADER_BYTES:HEADER_BYTES + n] = src[off:off + n]
                else:
                    np.copyto(self.slots_np[i][HEADER_BYTES:HEADER_BYTES + n], src_np[off:off + n])
                ring.publish(i, seq, HEADER_BYTES + n)
                self.seq = seq + 1
                off += n
        except CommError as e:
            if off:  # part of this message went out: the peer is left mid-message
                self.broken = str(e)
            raise


class SlotReceiver(_End):
    """Receives whole messages from an RxRing into user buffers. One receiver per direction."""

    def _next(self, deadline: float, op: str):
        """Wait for the next chunk; return (slot index, header fields) after checking its sequence number."""
        ring, seq = self.ring, self.seq
        if ring.published() <= seq:
            ring.wait(lambda: ring.published() > seq, deadline, op)
        i = seq % ring.nslots
        hseq, htag, htotal, hoff, hn = HEADER.unpack_from(self.slots_mv[i], 0)
        if hseq != seq or hn > self.payload or hoff + hn > htotal:
            self.broken = (f"corrupt chunk header: seq={hseq} (expected {seq}), offset={hoff}, nbytes={hn}, "
                           f"total={htotal}")
            raise FrameError(f"{self.kind} link: {self.broken}", op=op, peer=self.peer, host=self.host)
        return i, htag, htotal, hoff, hn

    def _consume(self):
        self.seq += 1
        self.ring.release(self.seq)

    def recv(self, buf, tag: int, deadline: float) -> None:
        dst = _as_bytes(buf)
        if dst.readonly:
            raise ValueError("recv needs a writable buffer")
        self._receive(dst, tag, deadline, None, None, False)

    def can_reduce(self, itemsize: int) -> bool:
        """Every chunk of a message holds whole elements (so a chunk can be reduced on its own)."""
        return self.payload % itemsize == 0

    def recv_reduce(self, dst: np.ndarray, tag: int, deadline: float, op: str, received_first: bool) -> None:
        """As recv, but each chunk is reduced from slot memory into `dst` (flat): no staging copy.
        The slot is released only after its chunk is reduced. Needs can_reduce(dst.itemsize)."""
        self._receive(_as_bytes(dst), tag, deadline, dst, op, received_first)

    def _receive(self, dst: memoryview, tag: int, deadline: float, red, op, received_first) -> None:
        """Check and consume the chunks of one message of len(dst) bytes; each chunk is copied into dst, or,
        when `red` (dst as a typed array) is given, reduced into it, before its slot is released.
        One loop for both so the checks live in one place; no per-call closures (small-message latency)."""
        if self.broken is not None:
            self._check("recv")
        want = len(dst)
        budget = deadline - time.monotonic() if want > self.payload else 0.0   # time allowed without progress
        i, htag, htotal, hoff, hn = self._next(deadline, "recv")
        if htag != tag or htotal != want or hoff != 0:
            self._discard(htotal, deadline)
            raise FrameError(f"{self.kind} frame mismatch: expected tag {tag:#x} length {want}, got tag {htag:#x} "
                             f"length {htotal} (that message was discarded; the link stays usable)",
                             op="recv", peer=self.peer, host=self.host)
        dst_np = np.frombuffer(dst, np.uint8) if red is None and want > SMALL_COPY else None
        isz = red.itemsize if red is not None else 1
        off = 0
        while True:
            if hoff != off or hn % isz:
                self.broken = f"chunk offset {hoff} size {hn}, expected offset {off} (message of {htotal} bytes)"
                raise FrameError(f"{self.kind} link: {self.broken}", op="recv", peer=self.peer, host=self.host)
            if red is not None:
                a = self.slots_np[i][HEADER_BYTES:HEADER_BYTES + hn].view(red.dtype)
                d = red[off // isz:(off + hn) // isz]
                if received_first:
                    combine(op, a, d, d)
                else:
                    combine(op, d, a, d)
            elif dst_np is None:
                dst[off:off + hn] = self.slots_mv[i][HEADER_BYTES:HEADER_BYTES + hn]
            else:
                np.copyto(dst_np[off:off + hn], self.slots_np[i][HEADER_BYTES:HEADER_BYTES + hn])
            off += hn
            self._consume()
            if off >= want:
                return
            deadline = time.monotonic() + budget  # a chunk arrived: the deadline counts from there
            i, htag, htotal, hoff, hn = self._next(deadline, "recv")
            if htag != tag or htotal != want:
                self.broken = f"chunk of another message (tag={htag}, length={htotal}) inside a message"
                raise FrameError(f"{self.kind} link: {self.broken}", op="recv", peer=self.peer, host=self.host)

    def _discard(self, total: int, deadline: float):
        """Consume the chunks of a message nobody will read, so the next recv starts in step."""
        self._consume()
        for _ in range(self.nchunks(total) - 1):
            self._next(deadline, "recv (discarding a mismatched message)")
            self._consume()


class SlotLink(Link):
    """A Link made of a SlotSender and a SlotReceiver over a backend's two rings (shm, rdma)."""

    def __init__(self, peer: int, host: str, tx_ring: TxRing, rx_ring: RxRing):
        super().__init__(peer, host)
        self._tx = SlotSender(tx_ring, peer, host, self.kind)
        self._rx = SlotReceiver(rx_ring, peer, host, self.kind)
        # a one-chunk message finds a free slot unless the peer has left nslots chunks unread
        self.eager_bytes = self._tx.payload
        self._closed = False

    def _closed_error(self, op):
        return CommError(f"{self.kind} link is closed", op=op, peer=self.peer, host=self.host)

    def send(self, buf, tag, deadline):
        tx = self._tx
        if tx is None:   # closed (shm drops its ends on close): an error naming the link, not an AttributeError
            raise self._closed_error("send")
        tx.send(buf, tag, deadline)

    def recv(self, buf, tag, deadline):
        rx = self._rx
        if rx is None:
            raise self._closed_error("recv")
        rx.recv(buf, tag, deadline)

    def recv_reduce(self, dst, tag, deadline, op, received_first=True):
        rx = self._rx
        if rx is None:
            raise self._closed_error("recv")
        if rx.can_reduce(dst.itemsize):
            rx.recv_reduce(dst, tag, deadline, op, received_first)
        else:
            super().recv_reduce(dst, tag, deadline, op, received_first)
