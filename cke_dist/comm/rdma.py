"""`rdma` links: a thin pyverbs binding under the slot protocol of cke_dist.comm.slots.

Per remote peer: one RC queue pair (own send and receive CQs) brought to RTS with the peer's QP number, LID,
GID and PSN exchanged through MPI, and three registered regions:
  rx ring   nslots x slot_bytes, remote-writable: the peer RDMA-WRITEs chunks here (WRITE WITH IMMEDIATE, so each
            chunk also consumes one posted receive and raises one completion = "slot published");
  tx ring   nslots x slot_bytes, local staging: chunks are copied here, then written to the peer's rx ring;
  credit    8 bytes, remote-writable: the peer RDMA-WRITEs (inline) its running count of released chunks here.
So publish = post WRITE_WITH_IMM, release = post an inline WRITE of the count, published() = receive completions
seen, released() = the credit word -- the same shape as shm, and everything else lives in slots.py.

Rules kept:
- pyverbs is imported only inside functions: the module imports (and `probe()` answers) without it.
- Device discovery never raises: `probe()` returns what it checked ("pyverbs not installed", "no device" --
  get_device_list() raises PyverbsRDMAError when there is none --, "no active port").
- One lock guards CQ polling and posting per link, so the send and receive threads can both make progress.
- A failed completion (a dead peer makes our writes fail after the RC retries, ~0.5 s) marks the link broken
  and raises PeerLost; a receiver waiting on a dead peer sees its deadline (CommTimeout). Waiting polls, then
  sleeps with backoff up to 1 ms (ranks may be oversubscribed).
- Settings: CKE_RDMA_DEVICE (name), CKE_RDMA_PORT (number), CKE_RDMA_GID_INDEX (RoCE GID table index).
Not run on RDMA hardware in CI (none exists there): tests/integration/test_rdma.py covers probe and the fallback
everywhere, and the link itself only where a device exists (marked `rdma`).
"""
from __future__ import annotations

import ctypes
import os
import random
import threading
import time
import warnings

import numpy as np

from cke_dist.comm.errors import CommTimeout, PeerLost
from cke_dist.comm.slots import RxRing, SlotLink, TxRing

DEFAULT_SLOT_BYTES = (1 << 20) + 64  # 1 MiB payload + header, as shm
DEFAULT_NSLOTS = 4
_SPIN_POLLS = 100
_MAX_SLEEP_S = 1e-3


def _pyverbs_version():
    try:
        from importlib.metadata import version

        return version("pyverbs")
    except Exception:
        return "unknown"


def _name(dev) -> str:
    n = dev.name
    return n.decode() if isinstance(n, bytes) else str(n)


def _pick_gid_index(ctx, port, link_layer) -> int:
    """GID index: CKE_RDMA_GID_INDEX, else 0 on InfiniBand, else the first RoCE v2 entry that is set."""
    import pyverbs.enums as e

    env = os.environ.get("CKE_RDMA_GID_INDEX")
    if env not in (None, ""):
        return int(env)
    if link_layer != e.IBV_LINK_LAYER_ETHERNET:
        return 0
    first_set = None
    for idx in range(ctx.query_port(port).gid_tbl_len):
        try:
            gid = ctx.query_gid(port, idx).gid
        except Exception:
            continue
        if gid.strip("0:") == "":
            continue
        first_set = idx if first_set is None else first_set
        try:
            if ctx.query_gid_type(port, idx) == e.IBV_GID_TYPE_ROCE_V2:
                return idx
        except Exception:
            pass
    return first_set if first_set is not None else 0


def probe() -> dict:
    """What this rank can offer RDMA: {"ok", "reason", "checked": [...], "version", "devices": [...],
    "use": {device, port, gid_index, lid, gid} or None}. Plain data: it travels in the bootstrap facts."""
    out = {"ok": False, "reason": "", "checked": [], "version": None, "devices": [], "use": None}
    checked = out["checked"]
    try:
        import pyverbs.device as d
        import pyverbs.enums as e
        from pyverbs.pyverbs_error import PyverbsError
    except ImportError as ex:
        checked.append(f"import pyverbs: failed ({ex}); install the extra: pip install 'cke-dist[rdma]'")
        out["reason"] = "rdma: pyverbs not installed"
        return out
    out["version"] = _pyverbs_version()
    checked.append(f"import pyverbs: ok (version {out['version']})")
    try:
        devs = d.get_device_list()
    except PyverbsError as ex:
        devs, why = [], f"get_device_list() raised {type(ex).__name__}: {ex}"
    else:
        why = "get_device_list() returned no device"
    if not devs:
        checked.append(f"RDMA devices: none ({why})")
        out["reason"] = "rdma: no device"
        return out
    want_dev = os.environ.get("CKE_RDMA_DEVICE") or None
    want_port = int(os.environ["CKE_RDMA_PORT"]) if os.environ.get("CKE_RDMA_PORT") else None
    for dev in devs:
        name = _name(dev)
        entry = {"name": name, "ports": []}
        out["devices"].append(entry)
        try:
            ctx = d.Context(name=name)
            try:
                nports = ctx.query_device().phys_port_cnt
                for port in range(1, nports + 1):
                    pa = ctx.query_port(port)
                    active = pa.state == e.IBV_PORT_ACTIVE
                    info = {"port": port, "active": active, "lid": int(pa.lid), "mtu": int(pa.active_mtu),
                            "link_layer": "Ethernet" if pa.link_layer == e.IBV_LINK_LAYER_ETHERNET else "InfiniBand",
                            "state": d.port_state_to_str(pa.state)}
                    if active:
                        gidx = _pick_gid_index(ctx, port, pa.link_layer)
                        info["gid_index"], info["gid"] = gidx, ctx.query_gid(port, gidx).gid
                    entry["ports"].append(info)
                    if (active and out["use"] is None and want_dev in (None, name)
                            and want_port in (None, port)):
                        out["use"] = {"device": name, "port": port, "gid_index": info["gid_index"],
                                      "lid": info["lid"], "gid": info["gid"], "mtu": info["mtu"]}
            finally:
                ctx.close()
        except PyverbsError as ex:
            entry["error"] = str(ex)
        checked.append(f"device {name}: " + (entry.get("error") or ", ".join(
            f"port {p['port']} {p['state']}" for p in entry["ports"]) or "no ports"))
    if out["use"] is None:
        wanted = f" matching CKE_RDMA_DEVICE={want_dev} CKE_RDMA_PORT={want_port}" if want_dev or want_port else ""
        out["reason"] = f"rdma: no active port{wanted}"
        return out
    out["ok"] = True
    out["reason"] = f"rdma: {out['use']['device']} port {out['use']['port']}"
    return out


class _Region:
    """A registered buffer and a numpy view of it."""

    def __init__(self, pd, nbytes, access):
        from pyverbs.mr import MR

        self.mr = MR(pd, nbytes, access)
        self.addr = int(self.mr.buf)
        self.view = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(self.addr))

    def close(self):
        self.view = None
        self.mr.close()


class _Verbs:
    """The per-peer verbs objects and the progress engine both directions share."""

    def __init__(self, pd, ctx, use, nslots, slot_bytes, link):
        import pyverbs.enums as e
        from pyverbs.cq import CQ
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr

        self.e, self.link, self.use = e, link, use
        self.nslots, self.slot_bytes = nslots, slot_bytes
        depth = 4 * nslots + 16
        self.scq, self.rcq = CQ(ctx, depth, None, None, 0), CQ(ctx, depth, None, None, 0)
        cap = QPCap(max_send_wr=2 * nslots + 8, max_recv_wr=nslots + 4, max_send_sge=1, max_recv_sge=1,
                    max_inline_data=64)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.scq, rcq=self.rcq, cap=cap)
        attr = QPAttr(port_num=use["port"])
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        self.qp = QP(pd, init, attr)  # RC: returned in INIT
        remote = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        self.rx = _Region(pd, nslots * slot_bytes, remote)
        self.tx = _Region(pd, nslots * slot_bytes, e.IBV_ACCESS_LOCAL_WRITE)
        self.credit = _Region(pd, 64, remote)
        self.credit_src = _Region(pd, 64, e.IBV_ACCESS_LOCAL_WRITE)
        self.psn = random.getrandbits(24)
        self.lock = threading.Lock()
        self.arrived = 0  # receive completions seen (chunks published to us)
        self.broken = None
        for _ in range(nslots + 2):
            self._post_recv()

    def endpoint(self) -> dict:
        return {"qpn": self.qp.qp_num, "psn": self.psn, "lid": self.use["lid"], "gid": self.use["gid"],
                "mtu": self.use["mtu"],
                "rx_addr": self.rx.addr, "rx_rkey": self.rx.mr.rkey,
                "credit_addr": self.credit.addr, "credit_rkey": self.credit.mr.rkey}

    def to_rts(self, remote: dict):
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr

        e = self.e
        self.remote = remote
        attr = QPAttr(port_num=self.use["port"])
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        attr.path_mtu = min(self.use["mtu"], remote["mtu"])  # ibv_mtu enum values grow with the size
        attr.dest_qp_num = remote["qpn"]
        attr.rq_psn = remote["psn"]
        attr.sq_psn = self.psn
        attr.max_dest_rd_atomic = 1
        attr.max_rd_atomic = 1
        attr.min_rnr_timer = 12
        attr.timeout = 14  # 4.096 us * 2^14 = 67 ms per try
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        gid = GID()
        gid.gid = remote["gid"]
        gr = GlobalRoute(dgid=gid, sgid_index=self.use["gid_index"])
        attr.ah_attr = AHAttr(port_num=self.use["port"], is_global=1, gr=gr, dlid=remote["lid"])
        self.qp.to_rts(attr)

    def _post_recv(self):
        from pyverbs.wr import RecvWR

        self.qp.post_recv(RecvWR(wr_id=0, num_sge=0))

    def post_write(self, src_addr, lkey, nbytes, raddr, rkey, imm=None, inline=False):
        from pyverbs.wr import SGE, SendWR

        e = self.e
        flags = e.IBV_SEND_SIGNALED | (e.IBV_SEND_INLINE if inline else 0)
        op = e.IBV_WR_RDMA_WRITE if imm is None else e.IBV_WR_RDMA_WRITE_WITH_IMM
        wr = SendWR(wr_id=1, opcode=op, num_sge=1, sg=[SGE(src_addr, nbytes, lkey)], send_flags=flags,
                    imm_data=imm or 0)
        wr.set_wr_rdma(rkey=rkey, addr=raddr)
        with self.lock:
            self.qp.post_send(wr)

    def progress(self, what):
        """Drain both CQs: count arrivals, repost receives, surface any failed completion."""
        e = self.e
        with self.lock:
            for cq, is_recv in ((self.rcq, True), (self.scq, False)):
                while True:
                    n, wcs = cq.poll(8)
                    if n <= 0:
                        break
                    for wc in wcs[:n]:
                        if wc.status != e.IBV_WC_SUCCESS:
                            self.broken = f"completion status {wc.status} (vendor error {wc.vendor_err})"
                        elif is_recv:
                            self.arrived += 1
                            self._post_recv()
        if self.broken:
            raise PeerLost(f"rdma {self.broken} during {what}", op=what, peer=self.link.peer, host=self.link.host)

    def wait(self, ready, deadline, what):
        sleep = 1e-6
        polls = 0
        while True:
            self.progress(what)
            if ready():
                return
            polls += 1
            if polls > _SPIN_POLLS:
                now = time.monotonic()
                if now >= deadline:
                    raise CommTimeout(f"rdma deadline passed during {what}", op=what, peer=self.link.peer,
                                      host=self.link.host)
                time.sleep(min(sleep, max(0.0, deadline - now)))
                sleep = min(sleep * 2, _MAX_SLEEP_S)

    def close(self):
        """Destroy the QP, CQs and memory regions; each is tried even after one fails, and failures are reported
        (a RuntimeWarning naming the object, the peer and the error) rather than silently dropped."""
        failed = []
        for name, obj in (("qp", self.qp), ("send cq", self.scq), ("recv cq", self.rcq), ("rx ring mr", self.rx),
                          ("tx ring mr", self.tx), ("credit mr", self.credit), ("credit source mr", self.credit_src)):
            try:
                obj.close()
            except Exception as e:  # pyverbs raises its own types; every one is reported below
                failed.append(f"{name}: {type(e).__name__}: {e}")
        if failed:
            peer = getattr(self.link, "peer", "?")
            warnings.warn(f"rdma link to rank {peer}: close could not release {len(failed)} verbs object(s): "
                          + "; ".join(failed), RuntimeWarning, stacklevel=2)


class _RdmaTx(TxRing):
    def __init__(self, v: _Verbs):
        self.v, self.nslots, self.slot_bytes = v, v.nslots, v.slot_bytes
        self.credit = v.credit.view.view(np.int64)

    def slot(self, i):
        return self.v.tx.view[i * self.slot_bytes:(i + 1) * self.slot_bytes]

    def released(self):
        return int(self.credit[0])

    def publish(self, i, seq, nbytes):
        v = self.v
        off = i * self.slot_bytes
        v.post_write(v.tx.addr + off, v.tx.mr.lkey, nbytes, v.remote["rx_addr"] + off, v.remote["rx_rkey"],
                     imm=i)
        v.progress("send")

    def wait(self, ready, deadline, what):
        self.v.wait(ready, deadline, what)


class _RdmaRx(RxRing):
    def __init__(self, v: _Verbs):
        self.v, self.nslots, self.slot_bytes = v, v.nslots, v.slot_bytes
        self.src = v.credit_src.view.view(np.int64)

    def published(self):
        return self.v.arrived

    def slot(self, i):
        return self.v.rx.view[i * self.slot_bytes:(i + 1) * self.slot_bytes]

    def release(self, count):
        v = self.v
        self.src[0] = count  # inline: the HCA copies it at post time, so the next release may overwrite it
        v.post_write(v.credit_src.addr, v.credit_src.mr.lkey, 8, v.remote["credit_addr"], v.remote["credit_rkey"],
                     inline=True)
        v.progress("recv")  # reap completions: send-queue entries are reclaimed only when their CQEs are polled

    def wait(self, ready, deadline, what):
        self.v.wait(ready, deadline, what)


class RdmaLink(SlotLink):
    kind = "rdma"

    def __init__(self, peer: int, host: str, verbs: _Verbs):
        self.verbs = verbs
        verbs.link = self
        super().__init__(peer, host, _RdmaTx(verbs), _RdmaRx(verbs))

    def close(self):
        if not self._closed:
            self._closed = True
            self.verbs.close()


class _Device:
    """The opened device and protection domain shared by every RdmaLink of this process."""

    def __init__(self, use):
        from pyverbs.device import Context
        from pyverbs.pd import PD

        self.ctx = Context(name=use["device"])
        self.pd = PD(self.ctx)


def connect_rdma(comm, peers, hosts, probe_result, *, nslots=DEFAULT_NSLOTS, slot_bytes=DEFAULT_SLOT_BYTES):
    """RC queue pairs to `peers`. Collective over `comm` (every rank calls it, possibly with no peers).
    Returns (links, failed): failed maps a peer to why its QP did not come up; both ranks of a pair agree."""
    rank = comm.Get_rank()
    verbs, failed, mine = {}, {}, {}
    dev = None
    if peers:
        try:
            if not probe_result.get("ok"):
                raise RuntimeError(probe_result.get("reason") or "rdma: unusable")
            dev = _Device(probe_result["use"])
            for p in peers:
                verbs[p] = _Verbs(dev.pd, dev.ctx, probe_result["use"], nslots, slot_bytes, link=None)
                verbs[p].device = dev  # the context and PD live as long as any link on them
                mine[p] = verbs[p].endpoint()
        except Exception as ex:  # any verbs failure here means "QPs did not come up": tell every peer
            for p in peers:
                failed[p] = f"rdma: setup failed on rank {rank}: {ex}"
    endpoints = comm.allgather((mine, failed))
    for p in peers:
        theirs, their_failed = endpoints[p]
        if p in failed:
            continue
        if rank in their_failed or rank not in theirs:
            failed[p] = their_failed.get(rank, f"rdma: rank {p} offered no queue pair")
            continue
        try:
            verbs[p].to_rts(theirs[rank])
        except Exception as ex:
            failed[p] = f"rdma: QP to RTS failed on rank {rank}: {ex}"
    # agreement: a pair is rdma only if both ends reached RTS
    outcome = comm.allgather(failed)
    for p in peers:
        if p not in failed and rank in outcome[p]:
            failed[p] = outcome[p][rank]
    links = {}
    for p, v in verbs.items():
        if p in failed:
            v.close()
        else:
            links[p] = RdmaLink(p, hosts[p], v)
    return links, failed
