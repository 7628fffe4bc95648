"""rdma with real ranks (driven by tests/integration/test_rdma.py under mpiexec -n 2; plain pytest skips this file).

Everywhere: a plan that asks for rdma whose queue pairs cannot come up (no device here) falls back to tcp under
`auto` with the reason, and raises TransportUnavailable on every rank when rdma was forced.
Only where a device exists (marked `rdma`): messages of every size class over real RC queue pairs.
"""
import secrets
import threading
import time

import numpy as np
import pytest
from mpi4py import MPI

from cke_dist.comm import rdma, select, tcp
from cke_dist.comm.errors import CommTimeout, FrameError, TransportUnavailable

comm = MPI.COMM_WORLD
PROBE = rdma.probe()
requires_device = pytest.mark.skipif(
    not comm.allreduce(int(PROBE["ok"]), op=MPI.MIN),
    reason=f"no usable RDMA device on every rank ({PROBE['reason']}; checked: {'; '.join(PROBE['checked'])})")


@pytest.fixture(scope="module")
def tcp_setup():
    rank, size = comm.Get_rank(), comm.Get_size()
    token = comm.bcast(secrets.token_bytes(16) if rank == 0 else None, root=0)
    listener = tcp.Listener(tcp.resolve_address(None), token, rank, size)
    facts = comm.allgather({"host": select.host_identity(), "rdma": PROBE, "tcp": listener.endpoint})
    yield rank, token, listener, facts
    listener.close()


def _all_rdma_plan(transport, facts):
    """The plan a job would make if every rank had claimed a device: rdma for every pair."""
    p = select.Plan(transport, [f["host"] for f in facts])
    for a in range(len(facts)):
        for b in range(a + 1, len(facts)):
            p.kind[(a, b)], p.reason[(a, b)] = "rdma", "test: every pair asked for rdma"
    return p


@pytest.mark.mpi(min_size=2)
def test_queue_pairs_that_do_not_come_up_fall_back_to_tcp_under_auto(tcp_setup):
    rank, token, listener, facts = tcp_setup
    if all(f["rdma"]["ok"] for f in facts):
        pytest.skip("every rank has a device: the queue pairs would come up")
    deadline = time.monotonic() + 30
    links, final = select.open_links(comm, _all_rdma_plan("auto", facts),
                                     lambda peers: tcp.open_links(rank, peers, facts, token, listener, deadline),
                                     rdma_probe=PROBE)
    try:
        assert {link.kind for link in links.values()} == {"tcp"}
        assert set(final.kind.values()) == {"tcp"}
        assert all("rdma: setup failed on rank" in why and "fell back to tcp" in why for why in final.reason.values())
        peer = 1 - rank if rank < 2 else None
        if peer is not None:  # the fallback links carry data
            out = np.empty(1000, np.float64)
            t = threading.Thread(target=links[peer].send,
                                 args=(memoryview(np.full(1000, rank, np.float64)), 3, time.monotonic() + 20))
            t.start()
            links[peer].recv(memoryview(out), 3, time.monotonic() + 20)
            t.join()
            assert (out == peer).all()
    finally:
        comm.Barrier()
        for link in links.values():
            link.close()


@pytest.mark.mpi(min_size=2)
def test_forced_rdma_whose_queue_pairs_do_not_come_up_raises_on_every_rank(tcp_setup):
    rank, token, listener, facts = tcp_setup
    if all(f["rdma"]["ok"] for f in facts):
        pytest.skip("every rank has a device: the queue pairs would come up")
    with pytest.raises(TransportUnavailable) as ei:
        select.open_links(comm, _all_rdma_plan("rdma", facts), lambda peers: {}, rdma_probe=PROBE)
    assert "transport=rdma: links did not come up" in str(ei.value)
    assert "rdma: no device" in str(ei.value) or "pyverbs not installed" in str(ei.value)


@pytest.fixture(scope="module")
def rdma_links():
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(select.host_identity())
    links, failed = rdma.connect_rdma(comm, [p for p in range(size) if p != rank], hosts, PROBE,
                                      nslots=3, slot_bytes=1 << 16)
    assert failed == {}
    yield links
    comm.Barrier()
    for link in links.values():
        link.close()


@pytest.mark.rdma
@requires_device
@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("nbytes", [0, 1, 12345, (1 << 16) + 1, (5 << 20) + 3])
def test_rdma_link_sizes(rdma_links, nbytes):
    links = rdma_links
    rng = np.random.default_rng(nbytes)
    data = rng.integers(0, 256, nbytes, np.uint8)
    threads = [threading.Thread(target=links[p].send, args=(memoryview(data), 5, time.monotonic() + 30))
               for p in links]
    for t in threads:
        t.start()
    for p in sorted(links):
        out = np.empty(nbytes, np.uint8)
        links[p].recv(memoryview(out), 5, time.monotonic() + 30)
        assert np.array_equal(out, data)
    for t in threads:
        t.join()
    comm.Barrier()


@pytest.mark.rdma
@requires_device
@pytest.mark.mpi(min_size=2)
def test_rdma_link_mismatch_and_deadline(rdma_links):
    links = rdma_links
    rank = comm.Get_rank()
    if rank == 0:
        links[1].send(memoryview(np.ones(300000, np.uint8)), 7, time.monotonic() + 30)
        links[1].send(memoryview(np.ones(4, np.uint8)), 8, time.monotonic() + 30)
    elif rank == 1:
        with pytest.raises(FrameError, match="rdma frame mismatch: expected tag 0x9"):
            links[0].recv(memoryview(np.empty(300000, np.uint8)), 9, time.monotonic() + 30)
        out = np.zeros(4, np.uint8)
        links[0].recv(memoryview(out), 8, time.monotonic() + 30)
        assert out.tolist() == [1, 1, 1, 1]
        with pytest.raises(CommTimeout):
            links[0].recv(memoryview(out), 8, time.monotonic() + 0.2)
    comm.Barrier()
