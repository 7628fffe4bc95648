"""The comm layer's parsers under hypothesis, and its deadline and close rules, in one process on real sockets and
real shm segments (no root needed; tests/cluster/test_chaos.py does the same over the virtual cluster).

- the TCP handshake: a real Listener accepts exactly the hellos that are complete and right (magic, job token,
  world size, an expected rank, a stream in range) and refuses, counts and closes everything else;
- the TCP frame header: whatever bytes arrive (bad magic, another tag, any length up to 2^64-1, cut short, the
  connection closed or left silent), recv returns the payload only for the right frame, raises FrameError before
  touching the buffer for a wrong header, PeerLost or CommTimeout for a short one, and never writes past the buffer;
- the shm slot header: the same for whatever header a corrupt peer publishes;
- a connection that trickles its hello is refused within handshake_s, not handshake_s per byte;
- deadlines count time without progress: a transfer that keeps moving outlives it, one that stops does not;
- ShmLink.close really unmaps its segment, and says so when it cannot.
"""
import os
import re
import socket
import threading
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cke_dist.comm import shm, tcp
from cke_dist.comm.errors import CommError, CommTimeout, FrameError, PeerLost
from cke_dist.comm.slots import HEADER, HEADER_BYTES

TOKEN = b"fuzz-token-16byt"
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])


def _read_all(s, limit_s=5.0):
    s.settimeout(limit_s)
    got = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return got
            got += chunk
            if len(got) >= tcp._ACK.size:
                return got
    except ConnectionResetError:
        return got


# ---- the handshake ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def listener():
    lis = tcp.Listener("127.0.0.1", TOKEN, rank=0, size=3, streams=2, handshake_s=0.5)
    lis.expect([1, 2])
    yield lis
    lis.close()


u32 = st.integers(0, 2**32 - 1)


@FUZZ
@given(magic=st.just(b"CKEH") | st.binary(min_size=4, max_size=4),
       token=st.just(TOKEN) | st.binary(min_size=16, max_size=16),
       peer=st.integers(0, 3) | u32, size=st.just(3) | u32, stream=st.integers(0, 2) | u32,
       cut=st.none() | st.integers(0, 31), tail=st.binary(max_size=40), junk=st.none() | st.binary(max_size=200))
def test_handshake_accepts_exactly_the_right_hellos(listener, magic, token, peer, size, stream, cut, tail, junk):
    if junk is not None:   # bytes with no structure at all
        data, cut = junk, len(junk) if len(junk) < tcp._HELLO.size else None
    else:
        hello = tcp._HELLO.pack(magic, token, peer, size, stream)
        data = hello[:cut] if cut is not None else hello + tail
    valid = (cut is None and data[:4] == b"CKEH" and data[4:20] == TOKEN
             and tcp._HELLO.unpack(data[:tcp._HELLO.size])[2:] in [(p, 3, s) for p in (1, 2) for s in (0, 1)])
    before = listener.rejected
    with socket.create_connection(listener.endpoint, timeout=5) as s:
        s.sendall(data)
        if cut is not None:
            s.shutdown(socket.SHUT_WR)   # a truncated hello, then end of stream
        reply = _read_all(s)
        if valid:
            p, _, st_ = tcp._HELLO.unpack(data[:tcp._HELLO.size])[2:]
            assert reply == tcp._ACK.pack(b"CKEA", TOKEN, 0)
            t = time.monotonic() + 5
            while (p, st_) not in listener._arrived:
                assert time.monotonic() < t, "an acknowledged connection never reached wait_for"
                time.sleep(0.001)
            with listener._cv:
                listener._arrived.pop((p, st_)).close()
            assert listener.rejected == before
        else:
            assert reply == b"", f"a bad hello got an answer: {reply!r}"
            assert listener.rejected == before + 1
    assert listener._thread.is_alive()


def test_a_trickling_hello_is_refused_within_handshake_s_in_all(caplog):
    """One byte every 0.2 s: once this was refused only after 32 bytes (handshake_s per read); now after 0.6 s."""
    lis = tcp.Listener("127.0.0.1", TOKEN, rank=0, size=2, handshake_s=0.6)
    try:
        hello = tcp._HELLO.pack(b"CKEH", TOKEN, 1, 2, 0)
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="cke_dist.comm"), \
                socket.create_connection(lis.endpoint, timeout=5) as s:
            s.settimeout(0.2)
            sent = 0
            for b in hello:
                try:
                    s.sendall(bytes([b]))
                    sent += 1
                    if s.recv(10) == b"":
                        break
                except TimeoutError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    break
            took = time.monotonic() - t0
        assert sent < 10 and took < 1.5, f"kept the trickling connection {took:.1f}s ({sent} bytes)"
        assert lis.rejected == 1
        assert "no complete hello frame within 0.6s" in caplog.text, caplog.text
    finally:
        lis.close()


# ---- the frame header -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv
    srv.close()


def _tcp_pair(server):
    """(raw writer socket, TcpLink reading from it)"""
    w = socket.create_connection(server.getsockname())
    r, _ = server.accept()
    return w, tcp.TcpLink(0, "fuzzhost", r)


@FUZZ
@given(n=st.sampled_from([0, 1, 7, 4096, 65536, 65537, 200_000]),
       magic=st.just(tcp._FRAME_MAGIC) | u32, tag=st.just(0x51) | u32,
       length=st.just(-1) | st.just(1 << 63) | st.integers(0, 2**64 - 1) | st.integers(0, 200_016),
       header_cut=st.none() | st.integers(0, 15), extra=st.integers(-200_016, 16), close=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_frame_parser_takes_only_the_right_frame(server, n, magic, tag, length, header_cut, extra, close, seed):
    length = n if length == -1 else length
    header = tcp._FRAME.pack(magic, tag, length)
    sent = max(0, n + extra)      # payload bytes that follow the header
    payload = np.random.default_rng(seed).integers(0, 256, sent, dtype=np.uint8).tobytes()
    data = header[:header_cut] if header_cut is not None else header + payload
    w, link = _tcp_pair(server)
    backing = np.full(n + 64, 0xA5, np.uint8)
    buf = backing[32:32 + n]
    def write():
        try:
            w.sendall(data)
            if close:
                w.shutdown(socket.SHUT_WR)
        except OSError:   # the reader gave up on a bad header and closed: what it should do
            pass
    writer = threading.Thread(target=write)
    writer.start()
    try:
        try:
            link.recv(memoryview(buf), 0x51, time.monotonic() + 0.05)
            outcome = "ok"
        except FrameError as e:
            outcome = "frame"
            assert (buf == 0xA5).all(), "a bad header let bytes into the buffer"
            assert (f"length {length}" in str(e)) or "bad frame magic" in str(e), e
        except PeerLost:
            outcome = "lost"
        except CommTimeout:
            outcome = "timeout"
    finally:
        writer.join()
        w.close()
        link.close()
    assert (backing[:32] == 0xA5).all() and (backing[32 + n:] == 0xA5).all(), "written past the buffer"
    if header_cut is not None:
        want = "lost" if close else "timeout"
    elif magic != tcp._FRAME_MAGIC or tag != 0x51 or length != n:
        want = "frame"
    elif sent >= n:
        want = "ok"
    else:
        want = "lost" if close else "timeout"
    assert outcome == want, (outcome, want)
    if want == "ok":
        assert buf.tobytes() == payload[:n]


# ---- the shm slot header ----------------------------------------------------------------------------------------

def _shm_pair(nslots=2, slot_bytes=4096):
    name = f"{shm.PREFIX}{os.getpid()}-fuzz{time.monotonic_ns()}-0-1"
    s0 = shm._create(name, nslots, slot_bytes)
    s1 = shm._attach(name)
    return shm.ShmLink(1, "here", s0, 0, os.getpid()), shm.ShmLink(0, "here", s1, 1, os.getpid())


PAYLOAD = 4096 - HEADER_BYTES
u64 = st.integers(0, 2**64 - 1)


@FUZZ
@given(n=st.sampled_from([0, 10, PAYLOAD - 1, PAYLOAD, PAYLOAD + 1, 3 * PAYLOAD]),
       seq=st.just(0) | u64, tag=st.just(9) | st.integers(-2**63, 2**63 - 1), total=st.just(-1) | u64 | st.integers(0, 5 * PAYLOAD),
       off=st.just(0) | u64, nbytes=st.just(-1) | u64 | st.integers(0, PAYLOAD + 8), seed=st.integers(0, 2**32 - 1))
def test_slot_parser_takes_only_the_right_chunk(n, seq, tag, total, off, nbytes, seed):
    total = n if total == -1 else total
    nbytes = min(n, PAYLOAD) if nbytes == -1 else nbytes
    a, b = _shm_pair()
    backing = np.full(n + 64, 0xA5, np.uint8)
    buf = backing[32:32 + n]
    try:
        # what a corrupt peer might publish in slot 0: any header, the payload it claims (as far as the slot holds)
        HEADER.pack_into(a._tx.slots_mv[0], 0, seq, tag, total, off, nbytes)
        body = np.random.default_rng(seed).integers(0, 256, min(nbytes, PAYLOAD), dtype=np.uint8)
        a._tx.slots_np[0][HEADER_BYTES:HEADER_BYTES + body.size] = body
        a._tx.ring.publish(0, 0, HEADER_BYTES + body.size)
        try:
            b.recv(memoryview(buf), 9, time.monotonic() + 0.02)
            outcome = "ok"
        except FrameError as e:
            outcome = "frame"
            assert (buf == 0xA5).all(), f"a bad header let bytes into the buffer: {e}"
        except CommTimeout:
            outcome = "timeout"
    finally:
        a.close()
        b.close()
    assert (backing[:32] == 0xA5).all() and (backing[32 + n:] == 0xA5).all(), "written past the buffer"
    corrupt = seq != 0 or nbytes > PAYLOAD or off + nbytes > total
    mismatch = tag != 9 or total != n or off != 0
    if corrupt:
        assert outcome == "frame"
    elif mismatch:
        # the mismatched message is discarded whole: one that claims more chunks waits for them (and times out)
        assert outcome == ("frame" if -(-total // PAYLOAD) <= 1 else "timeout"), outcome
    elif nbytes == n:
        assert outcome == "ok" and buf.tobytes() == body.tobytes()
    else:
        assert outcome == "timeout"   # a first chunk of the right message; the rest never comes


# ---- deadlines measure lack of progress ------------------------------------------------------------------------

def _trickle(w, data, piece, every, stop_after=None):
    for i in range(0, len(data), piece):
        if stop_after is not None and i >= stop_after:
            time.sleep(1.0)   # silent, connection open: twice the receiver's 0.5 s budget
            return
        w.sendall(data[i:i + piece])
        time.sleep(every)


@pytest.mark.parametrize("stall", [False, True], ids=["keeps-moving", "stalls"])
def test_a_receive_that_keeps_moving_outlives_its_deadline(server, stall):
    """400 KB arriving 20 KB per 0.1 s (2 s in all) against a 0.5 s deadline: received. The same stream stopping
    half way: CommTimeout about 0.5 s after the last byte, saying so and how far it got."""
    n = 400_000
    payload = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes()
    w, link = _tcp_pair(server)
    t = threading.Thread(target=_trickle, args=(w, tcp._FRAME.pack(tcp._FRAME_MAGIC, 3, n) + payload, 20_000, 0.1,
                                                n // 2 if stall else None))
    t.start()
    got = np.zeros(n, np.uint8)
    t0 = time.monotonic()
    try:
        if stall:
            with pytest.raises(CommTimeout, match=r"no progress for 0.5s; (\d+)/400000 bytes") as e:
                link.recv(memoryview(got), 3, time.monotonic() + 0.5)
            assert 1.0 < time.monotonic() - t0 < 2.0
            got_bytes = int(re.search(r"; (\d+)/400000 bytes", str(e.value)).group(1))
            assert "frame payload" in str(e.value) and 150_000 < got_bytes < 250_000, e.value
        else:
            link.recv(memoryview(got), 3, time.monotonic() + 0.5)
            assert time.monotonic() - t0 > 1.5 and got.tobytes() == payload
    finally:
        t.join()
        w.close()
        link.close()


@pytest.mark.parametrize("stall", [False, True], ids=["keeps-moving", "stalls"])
def test_a_send_that_keeps_moving_outlives_its_deadline(server, stall):
    """A reader taking 10 MB/s of a 24 MB message (~2 s once the socket buffers are full) against a 0.5 s deadline:
    sent. A reader that stops after 4 MB: CommTimeout 'no progress for 0.5s' with the bytes sent so far."""
    n = 24 << 20
    r = socket.create_connection(server.getsockname())
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    s, _ = server.accept()
    link = tcp.TcpLink(1, "reader", s)
    done = threading.Event()

    def read():
        total = 0
        while not done.is_set() and total < n + 16:
            if stall and total > (4 << 20):
                time.sleep(0.05)
                continue
            window = 0
            while window < (1 << 20) and total < n + 16:
                k = len(r.recv(1 << 20))
                if not k:
                    return
                window += k
                total += k
            time.sleep(0.1)
    t = threading.Thread(target=read)
    t.start()
    data = np.zeros(n, np.uint8)
    t0 = time.monotonic()
    try:
        if stall:
            with pytest.raises(CommTimeout, match=rf"no progress for 0.5s \((\d+)/{n} payload bytes sent\)"):
                link.send(memoryview(data), 5, time.monotonic() + 0.5)
        else:
            link.send(memoryview(data), 5, time.monotonic() + 0.5)
            assert time.monotonic() - t0 > 1.0
    finally:
        done.set()
        r.close()
        t.join()
        link.close()


def test_a_reply_waits_while_our_bytes_to_that_peer_still_drain(server):
    """We send 6 MB (the call returns once the socket buffer holds it), then wait 0.5 s-deadline receives for the
    peer's reply, which can only come once it has read all 6 MB (slowly: ~2 s). Our outgoing bytes draining is
    progress too, so the wait is not cut off; a peer that stops reading still times out."""
    n = 6 << 20
    r = socket.create_connection(server.getsockname())
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    s, _ = server.accept()
    link = tcp.TcpLink(1, "peer", s)

    def peer():
        got = 0
        while got < n + 16:
            window = 0
            while window < (512 << 10) and got < n + 16:
                k = len(r.recv(n + 16 - got))
                window += k
                got += k
            time.sleep(0.1)   # 5 MB/s: the 6 MB take ~1.2 s
        r.sendall(tcp._FRAME.pack(tcp._FRAME_MAGIC, 8, 4) + b"done")
    t = threading.Thread(target=peer)
    t.start()
    try:
        link.send(memoryview(np.zeros(n, np.uint8)), 7, time.monotonic() + 5)
        assert link._outq() > 0, "the message was already out: nothing left to drain"
        t0 = time.monotonic()
        reply = bytearray(4)
        link.recv(memoryview(reply), 8, time.monotonic() + 0.5)
        assert reply == b"done" and time.monotonic() - t0 > 1.0
    finally:
        t.join()
        r.close()
        link.close()


# ---- shm close -----------------------------------------------------------------------------------------------

def test_shm_close_unmaps_the_segment_and_reports_a_view_still_held():
    """close() once left the mapping in place every time (its own slot views kept it; the BufferError was
    swallowed). Now it is unmapped; a view held elsewhere is reported, naming the link."""
    a, b = _shm_pair()
    segs = (a.seg, b.seg)
    msg = np.arange(5000, dtype=np.uint8)
    t = threading.Thread(target=lambda: a.send(memoryview(msg), 1, time.monotonic() + 5))
    t.start()
    got = np.zeros(5000, np.uint8)
    b.recv(memoryview(got), 1, time.monotonic() + 5)
    t.join()
    assert (got == msg).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a.close()
        b.close()
    assert all(s.mm.closed for s in segs), "close() left the segment mapped"

    a, b = _shm_pair()
    held = np.frombuffer(a.seg.mm, np.uint8)[:8]   # someone keeps a view of the shared memory
    with pytest.warns(RuntimeWarning, match=r"shm link to rank 1 \(host here\): could not unmap its \d+ bytes"):
        a.close()
    b.close()
    assert not a.seg.mm.closed and b.seg.mm.closed
    del held
    with pytest.raises(CommError, match="link is closed|unusable"):
        a.send(memoryview(msg), 1, time.monotonic() + 1)


def test_liveness_does_not_cut_off_a_live_peer_that_is_slow_to_read(server):
    """A link with a 1 s liveness limit (TCP keepalive) sending 20 MB to a peer that reads nothing for 4 s (its
    window full): the send waits and completes under its 10 s deadline. (With TCP_USER_TIMEOUT, which Linux applies
    to zero-window probing, this connection was reset after 1 s as if the host were dead.)"""
    n = 20 << 20
    r = socket.create_connection(server.getsockname())
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    s, _ = server.accept()
    link = tcp.TcpLink(1, "peer", s, liveness_s=1.0)
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1

    def reader():
        time.sleep(4)
        got = 0
        while got < n + 16:
            got += len(r.recv(1 << 20))
    t = threading.Thread(target=reader)
    t.start()
    t0 = time.monotonic()
    try:
        link.send(memoryview(np.zeros(n, np.uint8)), 1, time.monotonic() + 10)
        assert time.monotonic() - t0 > 3.5
    finally:
        t.join()
        r.close()
        link.close()
