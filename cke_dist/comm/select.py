"""Which transport serves each peer pair, and opening the links that plan asks for.

`transport` = "auto" | "tcp" | "shm" | "rdma" (argument, else CKE_TRANSPORT, else "auto"):
- auto: shm for peers on the same host; rdma for remote peers when every rank has a usable device (and the queue
  pairs then come up); tcp otherwise. A pair whose shm segment or queue pair fails to come up falls back to tcp,
  with the reason.
- tcp: tcp everywhere. shm: shm everywhere, so every rank must be on one host. rdma: rdma everywhere.
  A forced transport that cannot serve a pair raises TransportUnavailable listing what was checked.

Rules kept:
- `plan()` is a pure function of the gathered per-rank facts ("host" and "rdma" = rdma.probe()), so every rank
  computes the same plan without another message; `open_links()` agrees on setup failures through one allgather
  so both ranks of a pair (and rank 0's log) see the same outcome. Either every rank raises or none does.
- Host identity is the fact "host": socket.gethostname(), or CKE_COMM_HOSTNAME (test-only: one machine poses as
  several hosts, so the tcp-between-hosts paths run in CI).
Tests: tests/integration/test_select.py (plans from facts, the fallback, forced errors) and tests/ranks/select_mpi.py.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from cke_dist.comm import shm
from cke_dist.comm.errors import TransportUnavailable


TRANSPORTS = ("auto", "tcp", "shm", "rdma")
HOST_ENV = "CKE_COMM_HOSTNAME"


def resolve_transport(transport=None) -> str:
    """The transport asked for: the argument, else CKE_TRANSPORT, else auto. Unknown names are an error."""
    value = transport if transport is not None else (os.environ.get("CKE_TRANSPORT") or "auto")
    value = str(value).strip().lower()
    if value not in TRANSPORTS:
        src = "transport" if transport is not None else "CKE_TRANSPORT"
        raise ValueError(f"{src}={value!r} is not a transport: use one of {', '.join(TRANSPORTS)}")
    return value


def host_identity() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def local_facts(transport: str) -> dict:
    """This rank's contribution to the bootstrap facts: its host and what rdma it can offer."""
    from cke_dist.comm import rdma

    if transport in ("auto", "rdma"):
        probe = rdma.probe()
    else:
        probe = {"ok": False, "reason": f"rdma: not probed (transport={transport})", "checked": [],
                 "version": None, "devices": [], "use": None}
    return {"host": host_identity(), "rdma": probe}


def _ranks(rs) -> str:
    """[0,1,2,5] -> '0-2,5'"""
    rs, out, i = sorted(rs), [], 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        out.append(str(rs[i]) if i == j else f"{rs[i]}-{rs[j]}")
        i = j + 1
    return ",".join(out)


def _layout(hosts) -> str:
    by: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        by.setdefault(h, []).append(r)
    return "; ".join(f"{h}: ranks {_ranks(rs)}" for h, rs in by.items())


@dataclass
class Plan:
    """kind[(a, b)] and reason[(a, b)] for every pair a < b."""

    transport: str
    hosts: list[str]
    kind: dict = field(default_factory=dict)
    reason: dict = field(default_factory=dict)

    def of(self, a: int, b: int) -> str:
        return self.kind[(min(a, b), max(a, b))]

    def peers(self, rank: int, kind: str) -> list[int]:
        return [p for p in range(len(self.hosts)) if p != rank and self.of(rank, p) == kind]

    def describe(self) -> list[str]:
        """Lines rank 0 prints at start: which transport serves which pairs, and why."""
        lines = [f"transport={self.transport}: {len(self.hosts)} ranks on {len(set(self.hosts))} host(s) "
                 f"({_layout(self.hosts)})"]
        groups: dict[tuple[str, str], list[str]] = {}
        for (a, b), k in sorted(self.kind.items()):
            groups.setdefault((k, self.reason[(a, b)]), []).append(f"{a}-{b}")
        for (k, why), pairs in groups.items():
            lines.append(f"  {k}: pairs {' '.join(pairs)} ({why})")
        return lines


def _rdma_everywhere(facts):
    """(ok, reason) for 'every rank has a usable device'."""
    bad = [r for r, f in enumerate(facts) if not f["rdma"]["ok"]]
    if not bad:
        devs = sorted({f["rdma"]["use"]["device"] for f in facts})
        return True, f"rdma: device {', '.join(devs)} on every rank"
    first = facts[bad[0]]["rdma"]["reason"]
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return False, f"{first} (rank {bad[0]}{more})"


def _rdma_checks(facts) -> str:
    """What was checked, per group of ranks that saw the same thing."""
    seen: dict[tuple, list[int]] = {}
    for r, f in enumerate(facts):
        if not f["rdma"]["ok"]:
            seen.setdefault((f["host"], tuple(f["rdma"]["checked"]) or (f["rdma"]["reason"],)), []).append(r)
    return "; ".join(f"ranks {_ranks(rs)} on {h}: " + "; ".join(checks) for (h, checks), rs in seen.items())


def plan(transport: str, facts) -> Plan:
    """The per-pair choice from every rank's facts. Raises TransportUnavailable for a forced transport that
    cannot serve some pair (on every rank alike: the facts are the same everywhere)."""
    transport = resolve_transport(transport)
    hosts = [f["host"] for f in facts]
    p = Plan(transport, hosts)
    n = len(facts)
    rdma_ok, rdma_why = _rdma_everywhere(facts) if n > 1 and transport in ("auto", "rdma") else (False, "")
    if transport == "rdma" and n > 1 and not rdma_ok:
        raise TransportUnavailable(
            f"transport=rdma cannot work here: {rdma_why}. Checked: {_rdma_checks(facts)}. "
            f"Use transport=auto (or tcp / shm), or fix the RDMA setup (CKE_RDMA_DEVICE, CKE_RDMA_PORT).")
    for a in range(n):
        for b in range(a + 1, n):
            same = hosts[a] == hosts[b]
            if transport == "tcp":
                k, why = "tcp", "transport=tcp"
            elif transport == "rdma":
                k, why = "rdma", f"transport=rdma; {rdma_why}"
            elif transport == "shm":
                if not same:
                    raise TransportUnavailable(
                        f"transport=shm cannot connect rank {a} (host {hosts[a]}) and rank {b} (host {hosts[b]}): "
                        f"shm only joins ranks on one host ({_layout(hosts)}). Use transport=auto to take shm "
                        f"within hosts and rdma/tcp between them.")
                k, why = "shm", "transport=shm"
            elif same:
                k, why = "shm", "same host"
            elif rdma_ok:
                k, why = "rdma", f"remote; {rdma_why}"
            else:
                k, why = "tcp", f"remote; {rdma_why}"
            p.kind[(a, b)], p.reason[(a, b)] = k, why
    return p


def open_links(comm, the_plan: Plan, open_tcp, *, rdma_probe=None, shm_options=None, rdma_options=None):
    """Open this rank's links as the plan says. Collective over `comm` (an mpi4py communicator holding every
    rank of the plan). `open_tcp(peers) -> {peer: Link}` opens tcp links (pairwise, not collective).
    Returns (links, final_plan): the final plan has shm/rdma pairs that failed to come up moved to tcp (auto),
    and is the same on every rank. With a forced transport a failure raises TransportUnavailable on every rank."""
    from cke_dist.comm import rdma

    rank = comm.Get_rank()
    hosts = the_plan.hosts
    links = {}
    shm_links, shm_failed = shm.connect_shm(comm, the_plan.peers(rank, "shm"), hosts, **(shm_options or {}))
    links.update(shm_links)
    any_rdma = "rdma" in the_plan.kind.values()
    rdma_failed = {}
    if any_rdma:  # every rank takes part (the plan is the same everywhere), even one with no rdma peer
        probe = rdma_probe if rdma_probe is not None else rdma.probe()
        rdma_links, rdma_failed = rdma.connect_rdma(comm, the_plan.peers(rank, "rdma"), hosts, probe,
                                                    **(rdma_options or {}))
        links.update(rdma_links)
    failures = comm.allgather({**shm_failed, **rdma_failed})
    final = Plan(the_plan.transport, hosts, dict(the_plan.kind), dict(the_plan.reason))
    broken = []
    for r, failed in enumerate(failures):
        for peer, why in failed.items():
            key = (min(r, peer), max(r, peer))
            kind = the_plan.kind[key]
            final.kind[key] = "tcp"
            final.reason[key] = f"{why}; fell back to tcp" if the_plan.transport == "auto" else why
            broken.append(f"ranks {key[0]}-{key[1]} ({kind}): {why}")
    if broken and the_plan.transport != "auto":
        for link in links.values():
            link.close()
        raise TransportUnavailable(f"transport={the_plan.transport}: links did not come up: "
                                   + "; ".join(sorted(set(broken))))
    tcp_peers = final.peers(rank, "tcp")
    for p in tcp_peers:  # a pair its peer gave up on (e.g. it saw another /dev/shm): drop our half
        if p in links:
            links.pop(p).close()
    if tcp_peers:
        links.update(open_tcp(tcp_peers))
    return links, final   # bootstrap.init prints final.describe() on rank 0
