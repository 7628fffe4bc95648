"""Selection with real ranks (driven by tests/integration/test_select.py under mpiexec; plain pytest skips this file):
facts gathered through MPI, the plan every rank agrees on, links opened as planned (shm within a host, tcp
between posed hosts, since this machine has no RDMA device), and data through every link.
"""
import secrets
import threading
import time

import numpy as np
import pytest
from mpi4py import MPI

from cke_dist.comm import select, tcp
from cke_dist.comm.errors import TransportUnavailable

comm = MPI.COMM_WORLD


def _gather_facts(transport, listener=None):
    mine = select.local_facts(transport)
    if listener is not None:
        mine["tcp"] = listener.endpoint
    return comm.allgather(mine)


@pytest.fixture(scope="module")
def opened():
    rank, size = comm.Get_rank(), comm.Get_size()
    token = comm.bcast(secrets.token_bytes(16) if rank == 0 else None, root=0)
    listener = tcp.Listener(tcp.resolve_address(None), token, rank, size)
    facts = _gather_facts("auto", listener)
    plan = select.plan("auto", facts)
    deadline = time.monotonic() + 30
    links, final = select.open_links(
        comm, plan, lambda peers: tcp.open_links(rank, peers, facts, token, listener, deadline),
        rdma_probe=facts[rank]["rdma"], shm_options={"nslots": 2, "slot_bytes": 1 << 16})
    yield facts, plan, links, final
    comm.Barrier()
    for link in links.values():
        link.close()
    listener.close()


@pytest.mark.mpi(min_size=2)
def test_every_rank_agrees_and_links_match_the_plan(opened):
    facts, plan, links, final = opened
    rank, size = comm.Get_rank(), comm.Get_size()
    everyone = comm.allgather((sorted(final.kind.items()), sorted(final.reason.items())))
    assert all(e == everyone[0] for e in everyone)
    assert sorted(links) == [p for p in range(size) if p != rank]
    for p, link in links.items():
        same = facts[p]["host"] == facts[rank]["host"]
        assert link.kind == final.of(rank, p) == ("shm" if same else ("rdma" if facts[0]["rdma"]["ok"] else "tcp"))
    if not all(f["rdma"]["ok"] for f in facts) and len({f["host"] for f in facts}) > 1:
        assert any("rdma: no device" in r or "pyverbs not installed" in r for r in final.reason.values())


@pytest.mark.mpi(min_size=2)
def test_data_through_every_link_at_once(opened):
    _, _, links, _ = opened
    rank = comm.Get_rank()
    n = (1 << 18) + 7  # several chunks of the 64 KiB test slots, odd length
    errors = []

    def send(p):
        try:
            links[p].send(memoryview(np.full(n, rank * 10 + p, np.int32)), 21, time.monotonic() + 30)
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=send, args=(p,)) for p in links]
    for t in threads:
        t.start()
    for p in sorted(links):
        out = np.empty(n, np.int32)
        links[p].recv(memoryview(out), 21, time.monotonic() + 30)
        assert (out == p * 10 + rank).all(), f"from rank {p} over {links[p].kind}"
    for t in threads:
        t.join()
    assert errors == []
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_forced_rdma_fails_the_same_way_on_every_rank(opened):
    facts, _, _, _ = opened
    if all(f["rdma"]["ok"] for f in facts):
        pytest.skip("every rank has an RDMA device: forced rdma can work here")
    with pytest.raises(TransportUnavailable) as ei:
        select.plan("rdma", facts)
    msgs = comm.allgather(str(ei.value))
    assert all(m == msgs[0] for m in msgs)
    assert "transport=rdma cannot work here" in msgs[0] and "Checked: ranks" in msgs[0]


@pytest.mark.mpi(min_size=2)
def test_forced_shm(opened):
    facts, _, _, _ = opened
    if len({f["host"] for f in facts}) > 1:
        with pytest.raises(TransportUnavailable, match="shm only joins ranks on one host"):
            select.plan("shm", facts)
    else:
        assert set(select.plan("shm", facts).kind.values()) == {"shm"}
