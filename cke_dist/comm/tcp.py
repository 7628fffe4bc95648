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
- Deadlines measure lack of progress, not total time: the time left when a send
  or receive starts is its budget, and every time bytes move the deadline moves
  to now + budget. A large message over a slow link that keeps moving is never
  cut off; one that stalls for the whole budget raises, saying how many bytes
  had moved. A receive also counts our own earlier bytes to that peer draining
  out of the socket buffer (SIOCOUTQ) as progress: the peer cannot answer before
  it has them. What it cannot see is a peer stuck behind a slow link elsewhere.
- Every link's socket has TCP keepalive tuned to the comm timeout, and a wait
  longer than that checks how long the peer's kernel has been silent (TCP_INFO):
  a peer host that stops answering (cable pulled, host dead) fails the link
  within about the comm timeout even under a longer deadline of the caller's
  own; a busy or stopped peer process still answers, so only the deadline
  catches that.
- An incoming connection has `handshake_s` in all (not per read) to present its
  hello: a peer that trickles bytes is refused as surely as a silent one.
Tests: tests/ranks/comm_collectives_mpi.py (stray connection, frames), tests/cluster/test_comm_faults.py,
tests/unit/test_comm_fuzz.py (handshake and frame parsers, progress deadlines), tests/cluster/test_chaos.py
(virtual cluster).
"""
from __future__ import annotations

import array
import errno
import fcntl
import hmac
import logging
import socket
import struct
import termios
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from cke_dist.comm.errors import CommError, CommTimeout, FrameError, PeerLost
from cke_dist.comm.transport import Link

log = logging.getLogger("cke_dist.comm")

_FRAME = struct.Struct("<IIQ")          # magic, tag, payload length
_FRAME_MAGIC = 0x314B4543               # "CEK1"
_HELLO = struct.Struct("<4s16sIII")     # magic, job token, sender rank, world size, stream index
_HELLO_MAGIC = b"CKEH"
_ACK = struct.Struct("<4s16sI")         # magic, job token, acceptor rank
_ACK_MAGIC = b"CKEA"
# Big socket buffers keep a ring step streaming while the receiver reduces.
_SOCKBUF = 4 << 20
# struct tcp_info up to tcpi_last_ack_recv (linux/tcp.h): 8 bytes of u8 fields, then 13 u32 of which the last
# two are the milliseconds since data / an ACK last came from the peer.
_TCP_INFO = struct.Struct("<8B13I")
# Below this a header and payload go out in one sendmsg and come in through one bounce read.
_SMALL = 64 << 10


def _tune(sock: socket.socket, liveness_s: float | None = None) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKBUF)
        except OSError:  # the kernel caps it; a smaller buffer still works
            pass
    if liveness_s:
        # Keepalive: the peer's kernel answers a probe after `idle` seconds without traffic, then every `intvl`,
        # so a live peer (busy or stopped processes included) is never silent for long; an idle connection whose
        # probes go unanswered fails with ETIMEDOUT after about liveness_s. The kernel sends no probes while data
        # is in flight, so waits also check the silence themselves (TcpLink._silent_s). TCP_USER_TIMEOUT is left
        # alone on purpose: Linux applies it to zero-window probing too, so a live peer that is merely slow to
        # read would be cut off.
        idle, intvl = _keepalive(liveness_s)
        count = max(1, -(-int(silence_limit(liveness_s) - idle) // intvl))   # the kernel gives up at the same time
        for opt, val in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", intvl), ("TCP_KEEPCNT", count)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def _keepalive(liveness_s: float) -> tuple[int, int]:
    """(idle, interval) seconds of the keepalive probes for a liveness limit."""
    return max(1, int(liveness_s / 4)), max(1, int(liveness_s / 8))


def silence_limit(liveness_s: float) -> float:
    """Seconds without a byte or an ACK from the peer after which a link is dead: the liveness limit, but never
    less than a live peer's longest keepalive silence (idle + two intervals)."""
    idle, intvl = _keepalive(liveness_s)
    return max(float(liveness_s), idle + 2.0 * intvl)


class TcpLink(Link):
    kind = "tcp"
    # Socket buffers hold this much without the peer reading, so such a send never blocks on the peer.
    eager_bytes = 64 << 10

    def __init__(self, peer: int, host: str, sock: socket.socket, liveness_s: float | None = None):
        super().__init__(peer, host)
        _tune(sock, liveness_s)
        self.liveness_s = liveness_s
        self._silence = silence_limit(liveness_s) if liveness_s else None
        self._rsock = sock
        self._ssock = sock.dup()
        self._hdr_in = bytearray(_FRAME.size)
        self._bounce = bytearray(_FRAME.size + _SMALL)
        self._outq_buf = array.array("i", [0])
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
        budget = deadline - time.monotonic()   # allowed time without progress (see the module note)
        sent = 0
        try:
            while parts:
                left = self._remaining(deadline)
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                n = sock.sendmsg(parts)
                if n:
                    sent += n
                    deadline = time.monotonic() + budget
                while parts and n >= len(parts[0]):
                    n -= len(parts[0])
                    parts.pop(0)
                if parts and n:
                    parts[0] = memoryview(parts[0])[n:]
        except TimeoutError as e:
            if e.errno == errno.ETIMEDOUT:  # the kernel gave up on the peer (see _tune), not our deadline
                raise self._fail(PeerLost, f"connection lost during send: {self._why(e)}", "send") from None
            raise self._fail(CommTimeout, f"send of {len(mv)} bytes (tag {tag:#x}) passed its deadline: no progress "
                                          f"for {max(budget, 0):.1f}s ({_moved(sent - _FRAME.size, len(mv))})",
                             "send") from None
        except OSError as e:
            raise self._fail(PeerLost, f"connection lost during send: {self._why(e)}", "send") from None

    # -- receive ------------------------------------------------------------
    def _read_into(self, mv, clock, what, at_least=None):
        """Fill `mv` (or at least its first `at_least` bytes); return the count read. `clock` is the
        receive's [deadline, budget, bytes queued to the peer]: a read that brings bytes, or a wait during which
        our queued bytes to the peer drained, moves the deadline to now + budget."""
        got, n = 0, len(mv)
        need = n if at_least is None else at_least
        sock = self._rsock
        try:
            while got < need:
                left = clock[0] - time.monotonic()
                if left <= 0:
                    q = self._outq()
                    if q < clock[2]:
                        # nothing came, but our own bytes to this peer kept moving: the peer is still taking in
                        # what we sent before (a slow link), and cannot answer before it has all of it
                        clock[0], clock[2] = time.monotonic() + clock[1], q
                        continue
                    raise TimeoutError
                silence = self._silence
                if silence is not None and left > silence:
                    # a wait longer than the liveness limit (a checkpoint barrier's): look at the peer every so often
                    if self._silent_s() > silence:
                        raise TimeoutError(errno.ETIMEDOUT, "no TCP segment from the peer")
                    left = silence / 2
                sock.settimeout(left)
                try:
                    k = sock.recv_into(mv[got:])
                except TimeoutError as e:
                    if e.errno == errno.ETIMEDOUT:
                        raise
                    continue  # a slice of the wait ran out: the checks at the top decide
                if k == 0:
                    raise self._fail(PeerLost, f"peer closed the connection during {what}", "recv")
                got += k
                clock[0] = time.monotonic() + clock[1]
        except TimeoutError as e:
            if e.errno == errno.ETIMEDOUT:  # the kernel gave up on the peer (see _tune), not our deadline
                raise self._fail(PeerLost, f"connection lost during {what}: {self._why(e)}", "recv") from None
            raise self._fail(CommTimeout, f"{what}: no data within the deadline (no progress for "
                                          f"{max(clock[1], 0):.1f}s; {got}/{n} bytes)", "recv") from None
        except CommError:
            raise
        except OSError as e:
            raise self._fail(PeerLost, f"connection lost during {what}: {self._why(e)}", "recv") from None
        return got

    def _outq(self) -> int:
        """Bytes sent to the peer and not yet acknowledged by its kernel (SIOCOUTQ)."""
        try:
            fcntl.ioctl(self._ssock.fileno(), termios.TIOCOUTQ, self._outq_buf, True)
        except (OSError, ValueError):
            return 0
        return self._outq_buf[0]

    def _silent_s(self) -> float:
        """Seconds since the peer's kernel last sent us anything (data or an ACK), from TCP_INFO; 0 if unknown."""
        try:
            info = _TCP_INFO.unpack_from(self._rsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104))
        except (OSError, ValueError, struct.error):
            return 0.0
        return min(info[-2], info[-1]) / 1000.0

    def _why(self, e: OSError) -> str:
        if e.errno == errno.ETIMEDOUT:
            limit = f"{self._silence:g}s" if self._silence else "the kernel's limit"
            return (f"host {self.host} stopped answering (nothing from it, not even a keepalive answer, for "
                    f"{limit}: link down or host dead) ({e})")
        return str(e)

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
        clock = [deadline, deadline - time.monotonic(), self._outq()]   # deadline, budget, bytes queued out
        if n <= _SMALL:
            # One read for header and payload; the payload lands in a bounce
            # buffer and is copied out only after the header checked out.
            # Never asks for more than this frame's bytes, so a well-formed
            # next frame is not consumed.
            b = memoryview(self._bounce)[:_FRAME.size + n]
            got = self._read_into(b, clock, "frame header", at_least=_FRAME.size)
            self._check_header(b, tag, n)
            if got < len(b):
                self._read_into(b[got:], clock, "frame payload")
            mv[:] = b[_FRAME.size:]
            return
        hdr = memoryview(self._hdr_in)
        self._read_into(hdr, clock, "frame header")
        self._check_header(hdr, tag, n)
        self._read_into(mv, clock, "frame payload")

    def close(self):
        if self._closed:
            return
        self._closed = True
        for s in (self._ssock, self._rsock):
            try:
                s.close()
            except OSError:
                pass


def _moved(sent: int, total: int) -> str:
    return f"{max(sent, 0)}/{total} payload bytes sent" if sent > 0 else f"none of {total} payload bytes sent"


def resolve_address(interface: str | None) -> str:
    """The IPv4 address to listen on: an address as given, an interface name, or the host name's."""
    import ipaddress

    if interface:
        try:
            return str(ipaddress.ip_address(interface))
        except ValueError:
            pass
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
        data = bytearray()
        deadline = time.monotonic() + self.handshake_s   # in all, not per read: trickling bytes does not help
        try:
            while len(data) < _HELLO.size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                conn.settimeout(left)
                chunk = conn.recv(_HELLO.size - len(data))
                if not chunk:
                    return self._reject(conn, addr, f"closed after {len(data)} of the {_HELLO.size} bytes of a "
                                                    f"hello frame")
                data += chunk
        except OSError as e:
            why = "timed out" if isinstance(e, TimeoutError) else e
            return self._reject(conn, addr, f"no complete hello frame within {self.handshake_s}s "
                                            f"({len(data)} of {_HELLO.size} bytes; {why})")
        magic, token, peer, size, stream = _HELLO.unpack(bytes(data))
        if magic != _HELLO_MAGIC:
            return self._reject(conn, addr, f"not a cke-dist hello frame (magic {magic!r})")
        if not hmac.compare_digest(token, self.token):
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


def open_links(rank, peers, facts, token, listener, deadline, liveness_s: float | None = None) -> dict[int, Link]:
    """TCP links to `peers`: this rank dials the lower ranks and accepts the higher ones. liveness_s: a link
    whose peer host acknowledges nothing for this long fails (see _tune); bootstrap passes the comm timeout."""
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
        parts = [TcpLink(p, hosts[p], sock, liveness_s) for sock in ss]
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
        # one thread per stream and direction, each running one call at a time
        self._workers = [(ThreadPoolExecutor(1, f"cke-tcp-send-{self.peer}.{i}"),
                          ThreadPoolExecutor(1, f"cke-tcp-recv-{self.peer}.{i}")) for i in range(1, len(parts))]

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
            err = err or j.exception()
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
                w.shutdown(wait=False)      # ends once the calls queued before are done


# Messages of at least this many bytes are striped over the streams of a StripedLink.
STRIPE_MIN = 1 << 20
