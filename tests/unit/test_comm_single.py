"""The communicator as one plain process (no mpiexec): a size-1 world where every collective is local."""
import numpy as np
import pytest

from cke_dist.comm import Communicator, init


@pytest.fixture(scope="module")
def world():
    return init()


def test_size_one_world(world):
    assert isinstance(world, Communicator)
    assert (world.rank, world.size) == (0, 1)
    assert init() is world  # one world per process


@pytest.mark.parametrize("op", ["sum", "avg", "max", "min", "prod"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_collectives_are_identity(world, op, dtype):
    if op == "avg" and np.dtype(dtype).kind == "i":
        with pytest.raises(ValueError, match="float"):
            world.allreduce(np.ones(3, dtype), op=op)
        return
    for length in (0, 1, 17):
        x = (np.arange(length) - 5).astype(dtype)
        y = x.copy()
        assert world.allreduce(y, op=op) is y
        np.testing.assert_array_equal(y, x)
        out = np.empty_like(x)
        world.allreduce(x, op=op, out=out)
        np.testing.assert_array_equal(out, x)
        r = np.empty_like(x)
        world.reduce_scatter(x, r, op=op)
        np.testing.assert_array_equal(r, x)
        g = np.empty_like(x)
        world.allgather(x, g)
        np.testing.assert_array_equal(g, x)


def test_async_and_barrier(world):
    x = np.arange(10.0)
    h = world.allreduce(x, op="avg", async_op=True)
    assert h.wait(timeout=10) is x
    np.testing.assert_array_equal(x, np.arange(10.0))
    world.barrier()
    world.broadcast(x, root=0)


def test_bad_input_is_named(world):
    with pytest.raises(ValueError, match="out .* must match buf"):
        world.allreduce(np.zeros(3), out=np.zeros(4))
    with pytest.raises(ValueError, match="root=1"):
        world.broadcast(np.zeros(3), root=1)
    with pytest.raises(ValueError, match="dst=0 is not another rank"):
        world.send(np.zeros(3), 0)
    with pytest.raises(ValueError, match="allgather: recv"):
        world.allgather(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros(3)
        ro.flags.writeable = False
        world.allreduce(ro)
    with pytest.raises(ValueError, match="distinct ranks"):
        world.split([0, 0])
    assert world.split([0]).size == 1
    # a tag that does not fit the frame's 16 bits is refused, not cut to a tag another message uses
    for bad in (1 << 16, -1, 2.0):
        with pytest.raises(ValueError, match="tags are integers in 0..65535"):
            world.send(np.zeros(3), 0, tag=bad)
        with pytest.raises(ValueError, match="tags are integers in 0..65535"):
            world.recv(np.zeros(3), 0, tag=bad)


def test_counters_record_each_ops_calls_and_bytes(world):
    world.reset_stats()
    world.allreduce(np.zeros(10, np.float32))
    world.allreduce(np.zeros(3, np.float64))
    world.broadcast(np.zeros(4, np.int32))
    assert world.stats == {"allreduce": [2, 64], "broadcast": [1, 16]}
    sub = world.split([0])
    sub.allreduce(np.zeros(2, np.float32))
    assert sub.stats == {"allreduce": [1, 8]} and world.stats["allreduce"] == [2, 64]   # per group


def test_listener_refuses_wrong_token_and_serves_the_right_one():
    """The TCP handshake on real sockets in one process: stray refused, real peer linked, frames checked."""
    import socket
    import time

    from cke_dist.comm import CommTimeout, FrameError, PeerLost, tcp

    token = b"k" * 16
    lis = tcp.Listener("127.0.0.1", token, rank=0, size=2, handshake_s=2)
    try:
        with socket.create_connection(lis.endpoint) as stray:
            stray.sendall(b"CKEH" + b"x" * 16 + (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + bytes(4))
            assert stray.recv(10) == b""
        deadline = time.monotonic() + 10
        sock = tcp.connect(lis.endpoint, token, 1, 2, 0, "here", deadline)
        got = lis.wait_for([1], deadline, ["here", "here"])
        assert lis.rejected == 1
        a, b = tcp.TcpLink(0, "here", sock), tcp.TcpLink(1, "here", got[1][0])
        for n in (0, 5, 100_000):
            src = np.arange(n, dtype=np.float32)
            dst = np.zeros(n, np.float32)
            a.send(memoryview(src), 7, deadline)
            b.recv(memoryview(dst).cast("B"), 7, deadline)
            np.testing.assert_array_equal(dst, src)
        # a frame longer than the receiver expects: error, and nothing past the buffer is written
        big = np.ones(10, np.float32)
        a.send(memoryview(big), 7, deadline)
        backing = np.full(12, -1.0, np.float32)
        with pytest.raises(FrameError, match="expected tag 0x7 length 16, got tag 0x7 length 40"):
            b.recv(memoryview(backing[:4]).cast("B"), 7, deadline)
        assert (backing == -1).all()
        with pytest.raises(PeerLost, match="earlier failure"):
            b.recv(memoryview(backing).cast("B"), 7, deadline)
        # nothing arrives before the deadline: CommTimeout naming the peer
        t0 = time.monotonic()
        with pytest.raises(CommTimeout, match="peer rank=0, host=here"):
            a.recv(memoryview(backing).cast("B"), 7, time.monotonic() + 0.3)
        assert time.monotonic() - t0 < 5
        a.close()
        b.close()
    finally:
        lis.close()


def test_interface_and_address_rules():
    from cke_dist.comm import tcp
    from cke_dist.comm.bootstrap import _check_addresses

    assert tcp.resolve_address("127.0.0.1") == "127.0.0.1"
    assert tcp.resolve_address("lo") == "127.0.0.1"
    with pytest.raises(ValueError, match="network interface 'nosuch0' not found.*available: .*lo"):
        tcp.resolve_address("nosuch0")
    one_host = [{"host": "a", "tcp": ("127.0.0.1", 1), "tcp_streams": 1}] * 2
    _check_addresses(one_host)  # loopback is right when every rank is on one host
    two_hosts = [{"host": "a", "tcp": ("10.0.0.1", 1), "tcp_streams": 1},
                 {"host": "b", "tcp": ("127.0.1.1", 1), "tcp_streams": 1}]
    with pytest.raises(ValueError, match="rank 1 on host 'b' listens on loopback.*Set interface="):
        _check_addresses(two_hosts)
    _check_addresses([dict(f, tcp_interface="lo") for f in two_hosts])  # named on purpose: trusted
    with pytest.raises(ValueError, match="disagree on CKE_TCP_STREAMS"):
        _check_addresses([dict(one_host[0]), dict(one_host[0], tcp_streams=2)])


def test_init_after_close_gives_a_new_world():
    """world.close() used to leave the module's world set, so init() returned the closed one."""
    from mpirun import run_program
    res = run_program("comm_reinit.py", timeout=60)
    assert res.returncode == 0 and "new world ok" in res.stdout, res.stderr[-2000:]
