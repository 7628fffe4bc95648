"""TCP transport: one persistent, authenticated connection per peer pair.

Rules this module keeps:
- Every connection starts with a hello frame carrying the job token; a
  connection without the right token (or from an unexpected rank) is closed and
  logged, and the listener keeps serving the real ranks.
- The listening socket binds to the job's address only, never to 0.0.0.0.
- A message is a 16-byte header (magic, tag, length) then the payload, written
  straight from the caller's memoryview and read straight into it with
  `recv_into`; the header is checked against the expected tag and length
  before one byte reaches the user's buffer.
- Send and receive use two socket objects over one connection (`dup`), so each
  direction has its own deadline and a ring step can send and receive at once.
- A deadline that passes raises `CommTimeout`, a closed peer `PeerLost`, a bad
  header `FrameError`; after any of them the link is marked broken.
Tests: tests/comm_collectives_mpi.py (stray connection, frames), tests/test_comm_faults.py.
"""
from __future__ import annotations

import hmac
import logging
import socket
import struct
import threading
import time

from .errors import CommError, CommTimeout, FrameError, PeerLost
from .transport import Link

log = logging.getLogger("cke_dist.comm")

_FRAME = struct.Struct("<IIQ")          # magic, tag, payload length
_FRAME_MAGIC = 0x314B4543               # "CEK1"
_HELLO = struct.Struct("<4s16sIII")     # magic, job token, sender rank, world size, stream index
_HELLO_MAGIC = b"CKEH"
_ACK = struct.Struct("<4s16sI")         # magic, job token, acceptor rank
_ACK_MAGIC = b"CKEA"
# Big socket buffers keep a ring step streaming while the receiver reduces.
_SOCKBUF = 4 << 20
# Below this a header and payload go out in one sendmsg and come in through one bounce read.
_SMALL = 64 << 10


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKBUF)
        except OSError:  # the kernel caps it; a smaller buffer still works
            pass


class TcpLink(Link):
    kind = "tcp"
    # Socket buffers hold this much without the peer reading, so such a send never blocks on the peer.
    eager_bytes = 64 << 10

    def __init__(self, peer: int, host: str, sock: socket.socket):
        super().__init__(peer, host)
        _tune(sock)
        self._rsock = sock
        self._ssock = sock.dup()
        self._hdr_in = bytearray(_FRAME.size)
        self._bounce = bytearray(_FRAME.size + _SMALL)
        self._broken: str | None = None
        self._closed = False

    # -- errors -------------------------------------------------------------
    def _fail(self, cls, msg, op):
        self._broken = self._broken or msg
        return cls(msg, op=op, peer=self.peer, host=self.host)

    def _check(self, op):
        if self._closed:
            raise CommError("link is closed", op=op, peer=self.peer, host=self.host)
        if self._broken:
            raise PeerLost(f"link unusable after an earlier failure: {self._broken}",
                           op=op, peer=self.peer, host=self.host)

    @staticmethod
    def _remaining(deadline):
        return deadline - time.monotonic()

    # -- send ---------------------------------------------------------------
    def send(self, buf, tag, deadline):
        self._check("send")
        mv = memoryview(buf).cast("B")
        parts = [_FRAME.pack(_FRAME_MAGIC, tag & 0xFFFFFFFF, len(mv)), mv]
        sock = self._ssock
        try:
            while parts:
                left = self._remaining(deadline)
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                n = sock.sendmsg(parts)
                while parts and n >= len(parts[0]):
                    n -= len(parts[0])
                    parts.pop(0)
                if parts and n:
                    parts[0] = memoryview(parts[0])[n:]
        except TimeoutError:
            raise self._fail(CommTimeout, f"send of {len(mv)} bytes (tag {tag:#x}) passed its deadline",
                             "send") from None
        except OSError as e:
            raise self._fail(PeerLost, f"connection lost during send: {e}", "send") from None

    # -- receive ------------------------------------------------------------
    def _read_into(self, mv, deadline, what, at_least=None):
        """Fill `mv` (or at least its first `at_least` bytes); return the count read."""
        got, n = 0, len(mv)
        need = n if at_least is None else at_least
        sock = self._rsock
        try:
            while got < need:
                left = self._remaining(deadline)
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                k = sock.recv_into(mv[got:])
                if k == 0:
                    raise self._fail(PeerLost, f"peer closed the connection during {what}", "recv")
                got += k
        except TimeoutError:
            raise self._fail(CommTimeout, f"{what}: no data within the deadline ({got}/{n} bytes)",
                             "recv") from None
        except CommError:
            raise
        except OSError as e:
            raise self._fail(PeerLost, f"connection lost during {what}: {e}", "recv") from None
        return got

    def _check_header(self, hdr, tag, n):
        magic, rtag, length = _FRAME.unpack_from(hdr)
        if magic != _FRAME_MAGIC:
            raise self._fail(FrameError, f"bad frame magic {magic:#x}: stream out of sync", "recv")
        if rtag != (tag & 0xFFFFFFFF) or length != n:
            raise self._fail(FrameError, f"frame mismatch: expected tag {tag:#x} length {n}, "
                                         f"got tag {rtag:#x} length {length}", "recv")

    def recv(self, buf, tag, deadline):
        self._check("recv")
        mv = memoryview(buf).cast("B")
        n = len(mv)
        if n <= _SMALL:
            # One read for header and payload; the payload lands in a bounce
            # buffer and is copied out only after the header checked out.
            # Never asks for more than this frame's bytes, so a well-formed
            # next frame is not consumed.
            b = memoryview(self._bounce)[:_FRAME.size + n]
            got = self._read_into(b, deadline, "frame header", at_least=_FRAME.size)
            self._check_header(b, tag, n)
            if got < len(b):
                self._read_into(b[got:], deadline, "frame payload")
            mv[:] = b[_FRAME.size:]
            return
        hdr = memoryview(self._hdr_in)
        self._read_into(hdr, deadline, "frame header")
        self._check_header(hdr, tag, n)
        self._read_into(mv, deadline, "frame payload")

    def close(self):
        if self._closed:
            return
        self._closed = True
        for s in (self._ssock, self._rsock):
            try:
                s.close()
            except OSError:
                pass


def resolve_address(interface: str | None) -> str:
    """The IPv4 address to listen on: an address as given, an interface name, or the host name's."""
    import ipaddress

    if interface:
        try:
            return str(ipaddress.ip_address(interface))
        except ValueError:
            pass
        import fcntl

        names = [n for _, n in socket.if_nameindex()]
        if interface not in names:
            raise ValueError(f"network interface {interface!r} not found on {socket.gethostname()}; "
                             f"available: {', '.join(names)}. Set interface= (or CKE_COMM_INTERFACE) "
                             f"to one of them or to an IPv4 address.")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915,  # SIOCGIFADDR
                                     struct.pack("256s", interface.encode()[:15]))
            except OSError as e:
                raise ValueError(f"network interface {interface!r} has no IPv4 address ({e}); "
                                 f"pick another with interface=") from None
        return socket.inet_ntoa(packed[20:24])
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class Listener:
    """The job's listening socket; authenticates every incoming connection on a thread of its own.

    Connections that present the token and an expected rank are handed to
    `wait_for`; everything else is closed and logged, for the life of the job.
    """

    def __init__(self, address: str, token: bytes, rank: int, size: int, streams: int = 1,
                 handshake_s: float = 5.0):
        self.token, self.rank, self.size, self.streams = token, rank, size, streams
        self.handshake_s = handshake_s
        self.rejected = 0                      # connections refused so far (tests read it)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((address, 0))
        self._sock.listen(128)
        self._sock.settimeout(0.2)
        self.endpoint = self._sock.getsockname()
        self._arrived: dict[tuple[int, int], socket.socket] = {}  # (rank, stream) -> socket
        # Higher ranks dial in as soon as they have the endpoints, maybe before
        # this rank reaches `open_links`: expect them from the start.
        self._expect: set[int] = set(range(rank + 1, size))
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="cke-comm-listener", daemon=True)
        self._thread.start()

    def expect(self, ranks):
        """Accept only these ranks from now on (those already arrived stay); [] closes the door."""
        with self._cv:
            self._expect = set(ranks)

    def _serve(self):
        while not self._stop:
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(conn, addr), daemon=True,
                             name="cke-comm-handshake").start()

    def _reject(self, conn, addr, why):
        log.warning("cke-dist comm: rejected connection from %s:%s: %s", addr[0], addr[1], why)
        with self._cv:
            self.rejected += 1
        try:
            conn.close()
        except OSError:
            pass

    def _handshake(self, conn, addr):
        try:
            conn.settimeout(self.handshake_s)
            data = bytearray()
            while len(data) < _HELLO.size:
                chunk = conn.recv(_HELLO.size - len(data))
                if not chunk:
                    return self._reject(conn, addr, "closed before sending a hello frame")
                data += chunk
        except OSError as e:
            return self._reject(conn, addr, f"no hello frame within {self.handshake_s}s ({e})")
        magic, token, peer, size, stream = _HELLO.unpack(bytes(data))
        if magic != _HELLO_MAGIC or not hmac.compare_digest(token, self.token):
            return self._reject(conn, addr, "wrong job token")
        with self._cv:
            if (size != self.size or peer not in self._expect or stream >= self.streams
                    or (peer, stream) in self._arrived):
                why = (f"rank {peer} stream {stream} of a {size}-rank job is not an expected peer "
                       f"(expected ranks {sorted(self._expect)}, {self.streams} stream(s) each)")
            else:
                why = None
        if why:
            return self._reject(conn, addr, why)
        try:
            conn.sendall(_ACK.pack(_ACK_MAGIC, self.token, self.rank))
            conn.settimeout(None)
        except OSError as e:
            return self._reject(conn, addr, f"could not answer the hello ({e})")
        with self._cv:
            # checked again: two connections claiming the same stream may have raced through the first check
            taken = (peer, stream) in self._arrived or peer not in self._expect
            if not taken:
                self._arrived[(peer, stream)] = conn
                self._cv.notify_all()
        if taken:
            self._reject(conn, addr, f"rank {peer} stream {stream} is already connected or no longer expected")

    def wait_for(self, ranks, deadline, hosts):
        """Block until every rank in `ranks` has connected all its streams; return {rank: [socket per stream]}."""
        with self._cv:
            while True:
                missing = [r for r in ranks if any((r, i) not in self._arrived for i in range(self.streams))]
                if not missing:
                    self._expect -= set(ranks)
                    return {r: [self._arrived.pop((r, i)) for i in range(self.streams)] for r in ranks}
                left = deadline - time.monotonic()
                if left <= 0:
                    r = missing[0]
                    raise CommTimeout(f"ranks {missing} did not connect within the deadline",
                                      op="bootstrap", group="world", peer=r, host=hosts[r])
                self._cv.wait(min(left, 0.5))

    def close(self):
        self._stop = True
        try:
            self._sock.close()
        except OSError:
            pass


def connect(endpoint, token, rank, size, peer, host, deadline, stream=0) -> socket.socket:
    """Open the connection to a lower rank's listener and authenticate both ways."""
    last = None
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection(tuple(endpoint), timeout=max(0.1, deadline - time.monotonic()))
            break
        except OSError as e:  # listener not up yet is impossible after the allgather; retry anyway
            last = e
            time.sleep(0.05)
    else:
        raise CommTimeout(f"could not connect to {endpoint[0]}:{endpoint[1]} ({last})",
                          op="bootstrap", group="world", peer=peer, host=host)
    try:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        sock.sendall(_HELLO.pack(_HELLO_MAGIC, token, rank, size, stream))
        data = bytearray()
        while len(data) < _ACK.size:
            chunk = sock.recv(_ACK.size - len(data))
            if not chunk:
                raise PeerLost("peer closed the connection during the handshake",
                               op="bootstrap", group="world", peer=peer, host=host)
            data += chunk
        magic, tok, prank = _ACK.unpack(bytes(data))
        if magic != _ACK_MAGIC or not hmac.compare_digest(tok, token) or prank != peer:
            raise FrameError(f"{endpoint[0]}:{endpoint[1]} answered with a wrong token or rank {prank}",
                             op="bootstrap", group="world", peer=peer, host=host)
        sock.settimeout(None)
        return sock
    except TimeoutError:
        sock.close()
        raise CommTimeout("handshake passed its deadline", op="bootstrap", group="world",
                          peer=peer, host=host) from None
    except OSError as e:
        sock.close()
        raise PeerLost(f"handshake failed: {e}", op="bootstrap", group="world", peer=peer,
                       host=host) from None


def open_links(rank, peers, facts, token, listener, deadline) -> dict[int, Link]:
    """TCP links to `peers`: this rank dials the lower ranks and accepts the higher ones."""
    hosts = [f["host"] for f in facts]
    streams = listener.streams
    higher = [p for p in peers if p > rank]
    listener.expect(higher)
    socks = {}
    for p in sorted(q for q in peers if q < rank):
        socks[p] = [connect(facts[p]["tcp"], token, rank, len(facts), p, hosts[p], deadline, stream=i)
                    for i in range(streams)]
    socks.update(listener.wait_for(higher, deadline, hosts))
    listener.expect([])  # every later connection is a stray: refused and logged
    links = {}
    for p, ss in socks.items():
        parts = [TcpLink(p, hosts[p], sock) for sock in ss]
        links[p] = parts[0] if streams == 1 else StripedLink(parts)
    return links


class StripedLink(Link):
    """One peer over several TCP streams: a large message is cut into one part per stream.

    Each part is a framed message of its own on its stream (tag and length
    checked there), so validation is the TcpLink's. Both sides cut by the same
    rule from the length they expect; a disagreement shows as a FrameError.
    Parts after the first move on per-stream threads, so the streams run at once.
    """

    kind = "tcp"

    def __init__(self, parts):
        super().__init__(parts[0].peer, parts[0].host)
        self.parts = parts
        self.eager_bytes = parts[0].eager_bytes
        self._workers = [(_Worker(f"cke-tcp-send-{self.peer}.{i}"), _Worker(f"cke-tcp-recv-{self.peer}.{i}"))
                         for i in range(1, len(parts))]

    def _cuts(self, n):
        if n < STRIPE_MIN:
            return [(0, n)]
        k = len(self.parts)
        per = -(-n // k)
        per = -(-per // 4096) * 4096  # page-aligned parts
        return [(min(i * per, n), min((i + 1) * per, n)) for i in range(k)]

    def _run(self, method, buf, tag, deadline):
        mv = memoryview(buf).cast("B")
        cuts = self._cuts(len(mv))
        if len(cuts) == 1:
            return getattr(self.parts[0], method)(mv, tag, deadline)
        side = 0 if method == "send" else 1
        jobs = [self._workers[i - 1][side].submit(getattr(self.parts[i], method), mv[a:b], tag, deadline)
                for i, (a, b) in enumerate(cuts) if i > 0]
        err = None
        try:
            getattr(self.parts[0], method)(mv[cuts[0][0]:cuts[0][1]], tag, deadline)
        except BaseException as e:
            err = e
        for j in jobs:
            e = j.wait()
            err = err or e
        if err is not None:
            raise err

    def send(self, buf, tag, deadline):
        self._run("send", buf, tag, deadline)

    def recv(self, buf, tag, deadline):
        self._run("recv", buf, tag, deadline)

    def close(self):
        for p in self.parts:
            p.close()
        for pair in self._workers:
            for w in pair:
                w.stop()


# Messages of at least this many bytes are striped over the streams of a StripedLink.
STRIPE_MIN = 1 << 20


class _Job:
    __slots__ = ("done", "error")

    def __init__(self):
        self.done = threading.Event()
        self.error = None

    def wait(self):
        self.done.wait()
        return self.error


class _Worker:
    """A thread running one call at a time for one stream direction."""

    def __init__(self, name):
        import queue

        self._q = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn, *args):
        job = _Job()
        self._q.put((fn, args, job))
        return job

    def stop(self):
        """End the thread once the calls queued before are done."""
        self._q.put(None)

    def _loop(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args, job = item
            try:
                fn(*args)
            except BaseException as e:
                job.error = e
            job.done.set()
