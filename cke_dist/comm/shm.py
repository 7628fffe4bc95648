"""`shm` links: peers on the same host talk through one shared-memory segment per pair.

Layout of a pair's segment (the lower rank creates it, the higher rank attaches):
  page 0: control. Per direction d (0 = lower->higher, 1 = higher->lower), each word on its own cache line:
          head (chunks published, written only by the sender), tail (chunks released, written only by the
          receiver), and two 32-bit futex words, bumped after every publish / release by the same writers,
          each followed by a "sleeping" flag its waiter sets.
          Then: magic, geometry, both pids, and one "closed" flag per side.
  then:   the ring of direction 0, then the ring of direction 1 (nslots x slot_bytes each, 64-byte aligned).
The slot protocol itself (chunks, headers, credits) is cke_dist.comm.slots; this file only says how to
publish (store head, bump the futex word, wake), release (the same for tail) and wait.

Rules kept:
- Single writer per word, 8-byte aligned stores; payload is written before head is stored. This relies on
  x86-64 total store order (stores are not reordered with stores, loads not with loads). The one store->load
  order TSO does not keep (publisher: store head, load "sleeping"; waiter: store "sleeping", load head) is
  forced with a locked instruction on both sides (_fence), so a wake-up is never lost and the futex syscall is
  made only when the peer actually sleeps.
- Waiting spins briefly (CKE_SHM_SPIN_US, 20), then yields the core between checks (up to CKE_SHM_YIELD_US, 200
  in all; a sender waiting for a free slot skips the yield phase), then blocks in futex_wait: ranks are
  oversubscribed here, and a spinning rank steals the core its peer needs. Each block is at most 50 ms,
  after which the peer's liveness is checked, so a dead peer raises PeerLost instead of hanging until the
  deadline.
- Memory: 2 x nslots x slot_bytes per pair (8 MiB by default), reserved up front (posix_fallocate) so a full
  /dev/shm fails setup cleanly (the pair falls back to tcp under auto); slots shrink when many ranks share a
  host (CKE_SHM_BYTES_PER_RANK, 64 MiB).
- No segment outlives setup: the attacher unlinks the name as soon as it has mapped it, the creator unlinks it
  after the attach round (whichever comes first wins), names still owned at exit are unlinked by atexit, and
  setup sweeps names left by creators that are dead (a rank killed inside the setup window).
Covered by tests/integration/test_shm_link.py and tests/ranks/shm_link_mpi.py; close() and the slot header
parser also by tests/unit/test_comm_fuzz.py.
"""
from __future__ import annotations

import atexit
import ctypes
import mmap
import os
import platform
import secrets
import threading
import time
import warnings

import numpy as np

from cke_dist.comm.errors import CommTimeout, PeerLost
from cke_dist.comm.slots import HEADER_BYTES, RxRing, SlotLink, TxRing

SHM_DIR = "/dev/shm"
PREFIX = "cke-shm-"
MAGIC = 0x636B6573686D3031  # "ckeshm01"
DEFAULT_SLOT_BYTES = (1 << 20) + 64  # 1 MiB of payload after the 64-byte header: a collective's 1 MiB chunk
DEFAULT_NSLOTS = 4                    # fits one slot
MIN_PAYLOAD = 64 << 10
# /dev/shm each rank may claim for its rings (both directions of every pair it creates and attaches); with many
# ranks on one host the slots shrink to fit, down to MIN_PAYLOAD.
BUDGET_BYTES = int(os.environ.get("CKE_SHM_BYTES_PER_RANK", 64 << 20))
SPIN_S = float(os.environ.get("CKE_SHM_SPIN_US", 20)) * 1e-6    # busy-check this long: a running peer answers
YIELD_S = float(os.environ.get("CKE_SHM_YIELD_US", 200)) * 1e-6  # then sched_yield between checks up to this
BLOCK_S = 0.05  # longest single futex sleep; liveness is checked between sleeps
STALE_AGE_S = 5.0  # a dead creator's segment younger than this may still be mid-setup elsewhere; leave it

_PAGE = mmap.PAGESIZE
# control page offsets (bytes)
_DIR_STRIDE = 256
_HEAD, _TAIL, _DATA_FUTEX, _CREDIT_FUTEX = 0, 64, 128, 192  # each futex word is followed by its "sleeping" flag
_META = 512  # magic, nslots, slot_bytes, creator pid, attacher pid, closed[0], closed[1]

_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
# x86-64 only: the ordering argument above is TSO's; weaker machines (aarch64) would need real barriers
_SYS_FUTEX = {"x86_64": 202}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex_wait(addr: int, expected: int, timeout_s: float) -> None:
    ts = _Timespec(int(timeout_s), int((timeout_s % 1.0) * 1e9))
    # returns at once if the word no longer holds `expected`; EINTR/EAGAIN/ETIMEDOUT all mean "look again"
    _syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT, ctypes.c_int(expected), ctypes.byref(ts), None, 0)


def _futex_wake(addr: int) -> None:
    _syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)


_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier: taking an uncontended lock is a locked (fencing) instruction on x86-64.
    Orders "store head/tail; load sleeping" against the waiter's "store sleeping; load head/tail"."""
    _fence_lock.acquire()
    _fence_lock.release()


def pid_alive(pid: int) -> bool:
    """True while `pid` runs on this host (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] not in (b"Z", b"X")


# names this process created and has not unlinked yet; unlinked at exit whatever happens to the job
_owned: set[str] = set()


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass
    _owned.discard(name)


@atexit.register
def _unlink_owned():
    for name in list(_owned):
        _unlink(name)


def sweep_stale(now: float | None = None) -> list[str]:
    """Unlink segments whose creating process is dead (left by a rank killed during setup). Returns the names."""
    removed = []
    now = time.time() if now is None else now
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX):].split("-", 1)[0])
            age = now - os.stat(os.path.join(SHM_DIR, name)).st_mtime
        except (ValueError, OSError):
            continue
        if age >= STALE_AGE_S and not pid_alive(pid):
            _unlink(name)
            removed.append(name)
    return removed


def segment_bytes(nslots: int, slot_bytes: int) -> int:
    return _PAGE + 2 * nslots * slot_bytes


class _Segment:
    """One mapped pair segment and typed views of its control page."""

    def __init__(self, fd: int, size: int):
        self.mm = mmap.mmap(fd, size)
        self.size = size
        ctrl = memoryview(self.mm)[:_PAGE]  # control words: memoryview items read as Python ints, fast
        self.q, self.i32 = ctrl.cast("q"), ctrl.cast("i")
        self.bytes = np.frombuffer(self.mm, dtype=np.uint8)
        self._anchor = ctypes.c_char.from_buffer(self.mm)
        self.addr = ctypes.addressof(self._anchor)

    def meta(self, k: int) -> int:
        return self.q[_META // 8 + k]

    def set_meta(self, k: int, v: int) -> None:
        self.q[_META // 8 + k] = v

    def close(self, what: str = "shm segment") -> bool:
        """Unmap. True when unmapped; False (with a RuntimeWarning saying what) when a view of the memory is
        still held somewhere, so the mapping can only go when that view is collected."""
        for mv in (self.q, self.i32):
            if mv is not None:
                mv.release()
        self.q = self.i32 = self.bytes = self._anchor = None
        try:
            self.mm.close()
            return True
        except BufferError as e:
            warnings.warn(f"{what}: could not unmap its {self.size} bytes of shared memory: a view of it is still "
                          f"held ({e}); the mapping stays until that view is garbage-collected", RuntimeWarning,
                          stacklevel=3)
            return False


_M_MAGIC, _M_NSLOTS, _M_SLOT, _M_CREATOR, _M_ATTACHER, _M_CLOSED0, _M_CLOSED1 = range(7)


class _ShmEnd:
    """What both ends of one direction share: the words, the futexes, the peer's liveness."""

    def __init__(self, seg: _Segment, direction: int, side: int, peer_pid: int, link: "ShmLink"):
        self.seg, self.link = seg, link
        base = direction * _DIR_STRIDE
        self.head_i, self.tail_i = (base + _HEAD) // 8, (base + _TAIL) // 8
        self.data_fi, self.credit_fi = (base + _DATA_FUTEX) // 4, (base + _CREDIT_FUTEX) // 4
        self.data_addr = seg.addr + base + _DATA_FUTEX
        self.credit_addr = seg.addr + base + _CREDIT_FUTEX
        self.peer_closed_k = _M_CLOSED1 if side == 0 else _M_CLOSED0
        self.peer_pid = peer_pid
        self.nslots = seg.meta(_M_NSLOTS)
        self.slot_bytes = seg.meta(_M_SLOT)
        ring0 = _PAGE + direction * self.nslots * self.slot_bytes
        self.slots = [seg.bytes[ring0 + i * self.slot_bytes: ring0 + (i + 1) * self.slot_bytes]
                      for i in range(self.nslots)]

    def slot(self, i):
        return self.slots[i]

    def _bump(self, fi: int, addr: int, always=False):
        """After a publish/release: change the futex word, and wake the peer only if it sleeps on it
        (a syscall per chunk would cost ~1 us of a ~5 us small-message round trip)."""
        i32 = self.seg.i32
        i32[fi] = (i32[fi] + 1) & 0x7FFFFFFF
        _fence()
        if always or i32[fi + 1]:
            _futex_wake(addr)

    def _wait(self, ready, deadline, what, fi, addr, yield_s=YIELD_S):
        # 1) spin: the peer is running and answers within microseconds; 2) yield: stay runnable but let the
        # ranks and threads that share our core run (oversubscribed hosts); 3) sleep on the futex.
        t0 = time.perf_counter()
        while True:
            for _ in range(16):
                if ready():
                    return
            elapsed = time.perf_counter() - t0
            if elapsed > yield_s:
                break
            if elapsed > SPIN_S:
                os.sched_yield()
        i32, seg, link = self.seg.i32, self.seg, self.link
        while True:
            i32[fi + 1] = 1  # "sleeping": the peer's next publish/release must wake us
            _fence()
            word = i32[fi]
            if ready():
                i32[fi + 1] = 0
                return
            if seg.meta(self.peer_closed_k):
                raise PeerLost(f"shm peer closed the link during {what}", op=what, peer=link.peer, host=link.host)
            now = time.monotonic()
            if now >= deadline:
                i32[fi + 1] = 0
                raise CommTimeout(f"shm deadline passed during {what}", op=what, peer=link.peer, host=link.host)
            _futex_wait(addr, word, min(deadline - now, BLOCK_S))
            i32[fi + 1] = 0
            if not ready() and time.monotonic() - now >= BLOCK_S * 0.9 and not pid_alive(self.peer_pid):
                if ready():
                    return
                raise PeerLost(f"shm peer process {self.peer_pid} died during {what}", op=what,
                               peer=link.peer, host=link.host)


class _ShmTx(_ShmEnd, TxRing):
    def released(self):
        return self.seg.q[self.tail_i]

    def publish(self, i, seq, nbytes):
        self.seg.q[self.head_i] = seq + 1
        self._bump(self.data_fi, self.data_addr)

    def wait(self, ready, deadline, what):
        # A credit wait means every slot is full: the receiver has a whole slot (up to a MiB) to copy or reduce
        # before one frees, far longer than a futex round trip. Spin, then sleep at once: yielding here would
        # keep a core busy that the receiver (or another rank) needs on an oversubscribed host.
        self._wait(ready, deadline, what, self.credit_fi, self.credit_addr, yield_s=SPIN_S)


class _ShmRx(_ShmEnd, RxRing):
    def published(self):
        return self.seg.q[self.head_i]

    def release(self, count):
        self.seg.q[self.tail_i] = count
        self._bump(self.credit_fi, self.credit_addr)

    def wait(self, ready, deadline, what):
        self._wait(ready, deadline, what, self.data_fi, self.data_addr)


class ShmLink(SlotLink):
    """A Link over one pair segment. side 0 = the lower rank (creator), side 1 = the higher rank."""

    kind = "shm"

    def __init__(self, peer: int, host: str, seg: _Segment, side: int, peer_pid: int):
        self.seg, self.side = seg, side
        tx_dir, rx_dir = (0, 1) if side == 0 else (1, 0)
        super().__init__(peer, host, _ShmTx(seg, tx_dir, side, peer_pid, self),
                         _ShmRx(seg, rx_dir, side, peer_pid, self))

    def close(self):
        """Tell the peer, then unmap the segment. Every view of the slots this link made is released first (they
        once kept the mapping alive after close, silently); one still held elsewhere gives a RuntimeWarning."""
        if self._closed:
            return
        self._closed = True
        seg = self.seg
        seg.set_meta(_M_CLOSED0 if self.side == 0 else _M_CLOSED1, 1)
        # wake a peer blocked on us so it sees the flag (through the two words this side writes)
        tx, rx = self._tx.ring, self._rx.ring
        tx._bump(tx.data_fi, tx.data_addr, always=True)
        rx._bump(rx.credit_fi, rx.credit_addr, always=True)
        for end in (self._tx, self._rx):
            for mv in end.slots_mv:
                try:
                    mv.release()
                except BufferError:  # exported further: the unmap below then warns, naming this link
                    pass
            end.slots_mv = end.slots_np = None
            end.ring.slots = None
        del tx, rx, end
        self._tx = self._rx = None
        seg.close(f"shm link to rank {self.peer} (host {self.host})")


def slot_bytes_for(n_local_peers: int, nslots: int = DEFAULT_NSLOTS) -> int:
    """Slot size that keeps one rank's rings within BUDGET_BYTES: 1 MiB payload for a few local peers,
    halving (to at least MIN_PAYLOAD) as the number of ranks on the host grows."""
    payload = DEFAULT_SLOT_BYTES - HEADER_BYTES
    while payload > MIN_PAYLOAD and max(n_local_peers, 1) * 2 * nslots * payload > BUDGET_BYTES:
        payload //= 2
    return payload + HEADER_BYTES


def _create(name: str, nslots: int, slot_bytes: int) -> _Segment:
    size = segment_bytes(nslots, slot_bytes)
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    _owned.add(name)
    try:
        # reserve the pages now: a full /dev/shm (64 MiB in a default container) is then a clean ENOSPC here,
        # not a SIGBUS at the first copy into a page that cannot be backed; it also keeps page faults out of
        # the first timed transfer
        os.posix_fallocate(fd, 0, size)
        seg = _Segment(fd, size)
    except OSError:
        _unlink(name)
        raise
    finally:
        os.close(fd)
    seg.set_meta(_M_NSLOTS, nslots)
    seg.set_meta(_M_SLOT, slot_bytes)
    seg.set_meta(_M_CREATOR, os.getpid())
    seg.set_meta(_M_MAGIC, MAGIC)
    return seg


def _attach(name: str) -> _Segment:
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        seg = _Segment(fd, size)
    finally:
        os.close(fd)
    _unlink(name)  # both ends hold the mapping now; the name is no longer needed
    if seg.meta(_M_MAGIC) != MAGIC or segment_bytes(seg.meta(_M_NSLOTS), seg.meta(_M_SLOT)) != size:
        seg.close()
        raise ValueError(f"{path} is not a cke-dist shm segment of the expected layout")
    seg.set_meta(_M_ATTACHER, os.getpid())
    return seg


def connect_shm(comm, peers, hosts, *, nslots: int = DEFAULT_NSLOTS, slot_bytes: int | None = None):
    """Open shm links to `peers` (world ranks on this host). Collective: every rank of `comm` calls it,
    each with its own peer list (pairs must be symmetric). Returns (links, failed) where failed maps a peer to
    the reason shm could not serve it; both ranks of a pair see the same outcome. slot_bytes defaults to
    slot_bytes_for(len(peers)); the creator's choice is written in the segment and read by the attacher."""
    rank = comm.Get_rank()
    if slot_bytes is None:
        slot_bytes = slot_bytes_for(len(peers), nslots)
    token = comm.bcast(secrets.token_hex(6) if rank == 0 else None, root=0)
    pid = os.getpid()
    made, failed, segs = {}, {}, {}
    if _SYS_FUTEX is None:  # still take part in every collective round below: other hosts may differ
        failed = {p: f"shm: supported on x86-64 only (this host is {platform.machine()})" for p in peers}
    else:
        sweep_stale()
    for p in sorted(peers):
        if p > rank and p not in failed:
            name = f"{PREFIX}{pid}-{token}-{rank}-{p}"
            try:
                segs[p] = _create(name, nslots, slot_bytes)
                made[p] = name
            except OSError as e:
                failed[p] = f"shm: cannot create {SHM_DIR}/{name}: {e.strerror or e}"
    offers = comm.allgather((made, pid))
    for p in sorted(peers):
        if p < rank and p not in failed:
            name = offers[p][0].get(rank)
            if name is None:
                failed[p] = "shm: the peer could not create the segment"
                continue
            try:
                segs[p] = _attach(name)
            except (OSError, ValueError) as e:
                failed[p] = f"shm: cannot attach {SHM_DIR}/{name}: {e}"
    # second round: creators learn who attached (and unlink what nobody took); both sides agree on failures
    outcome = comm.allgather(failed)
    for p in list(segs):
        if p > rank:
            _unlink(made[p])
            if rank in outcome[p] or segs[p].meta(_M_ATTACHER) != offers[p][1]:
                failed.setdefault(p, outcome[p].get(rank) or "shm: the peer attached another segment "
                                                             "(a different /dev/shm?)")
        else:
            if rank in outcome[p]:
                failed.setdefault(p, outcome[p][rank])
    links = {}
    for p, seg in segs.items():
        if p in failed:
            seg.close()
            continue
        links[p] = ShmLink(p, hosts[p], seg, 0 if rank < p else 1, offers[p][1])
    return links, failed
