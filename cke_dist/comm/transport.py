"""The transport interface: what a collective needs from a link to one peer.

A `Link` moves whole messages of bytes between this rank and one peer, in
order, each message carrying a tag the receiver checks. Collectives are written
once over this interface; `tcp`, `shm` and `rdma` each implement it.

Rules every implementation keeps:
- `send` and `recv` on the same link may run at the same time from two threads
  (a ring step posts a send and a receive together); two sends (or two
  receives) on one link are never concurrent: the caller serialises them.
- Messages arrive in the order they were sent. `recv(buf, tag)` fills exactly
  `buf` (a writable contiguous memoryview): a message whose tag or length differs
  raises `FrameError` before anything past `buf` is written.
- `deadline` is a `time.monotonic()` value; passing it raises `CommTimeout`,
  a closed or dead peer raises `PeerLost`. Both name the peer rank and host.
- Buffers are sent without copying them into Python objects (memoryviews).
- `recv_reduce(dst, ...)` receives a message of dst.nbytes and folds it into
  `dst` (dst = received op dst, or dst op received): the same checks as
  `recv`, the same operand order whatever the transport, so results stay
  bitwise equal across transports. The default stages the message in a
  per-link scratch buffer; slot links reduce straight from slot memory and
  save that pass.
"""
from __future__ import annotations

import abc

import numpy as np

from cke_dist.comm.reduce_ops import combine


class Link(abc.ABC):
    """A connection to one peer. `peer` is the peer's world rank, `host` its host name."""

    kind: str = "?"  # "tcp" | "shm" | "rdma"
    # A `send` of at most this many bytes returns without the peer posting its
    # `recv` (it fits the socket buffer / a free slot). Collectives send such
    # messages inline and skip the hand-off to the send thread; 0 means "always
    # hand off", which is always safe.
    eager_bytes: int = 0

    def __init__(self, peer: int, host: str):
        self.peer = peer
        self.host = host

    @abc.abstractmethod
    def send(self, buf: memoryview, tag: int, deadline: float) -> None:
        """Send all of `buf` as one message; return once the buffer may be reused."""

    @abc.abstractmethod
    def recv(self, buf: memoryview, tag: int, deadline: float) -> None:
        """Receive one message of exactly len(buf) bytes with this tag into `buf`."""

    def recv_reduce(self, dst: np.ndarray, tag: int, deadline: float, op: str,
                    received_first: bool = True) -> None:
        """Receive one message of exactly dst.nbytes and reduce it into the flat array `dst`.

        received_first: the message is op's first operand (callers fix the order, so results never depend on
        timing or transport)."""
        scratch = getattr(self, "_reduce_scratch", None)
        if scratch is None or scratch.nbytes < dst.nbytes:
            # one per link: receives on a link are serialised, so nothing else uses it meanwhile
            scratch = self._reduce_scratch = np.empty(dst.nbytes, np.uint8)
        t = scratch[:dst.nbytes].view(dst.dtype)
        self.recv(memoryview(t).cast("B"), tag, deadline)
        if received_first:
            combine(op, t, dst, dst)
        else:
            combine(op, dst, t, dst)

    @abc.abstractmethod
    def close(self) -> None:
        """Release the link's resources; idempotent."""
