"""Communicators: the world and its `split` sub-groups, sync and async ops, one engine per group family.

Rules this module keeps:
- An engine runs the ops of its groups one at a time, in the order they were
  issued (a sync op runs in the caller's thread when nothing is queued,
  otherwise it queues behind the async ones and waits). The world has an
  engine; every split of the world (the grid's dp, pp and tp groups) gets an
  engine of its own, and a split of a sub-group shares its parent's. So
  ordering is per group, as in MPI and NCCL: a tp allreduce on the critical
  path never waits behind dp buckets in flight, and every member of a group
  (and of the sub-groups that share its engine) must issue its collectives in
  the same order.
- Links are shared by all groups. Groups made by splitting the world into
  axes (dp, pp, tp) meet no common peer, so their engines never share a link;
  the world (which meets everyone) and its splits do, so before an op starts
  on the world the other engines are drained, and the other way round. A link
  therefore never carries two groups' messages at once.
- The one exception to "one op at a time": a queued point-to-point send moves
  to the send thread and the next op starts, so `send(async_op=True)` + `recv`
  on both ranks of a pair works like MPI's Isend/Recv (see Engine).
- `async_op=True` returns a `Handle`; the op runs on the engine's comm thread
  so kernels that release the GIL overlap with it. The caller must not touch
  the buffer until `wait()` returns.
- Within an op, sends that cannot complete before the peer receives go through
  the engine's send thread so a ring step sends and receives at once.
- Tags carry (group id, op code, per-group sequence number): a rank that is in
  a different collective than its peer gets `FrameError`, never mixed data. A
  point-to-point tag that does not fit its 16 bits is an error, never cut.
- Each group counts its collectives and their bytes (`stats`), so a test can
  assert the exact traffic of a training step.
- The first `CommError` breaks every engine of the process: every later op
  raises at once, and (with `abort_on_error`) the job is aborted through MPI
  at exit or when the error goes uncaught, so no rank is left waiting.
Tests: tests/ranks/comm_collectives_mpi.py, tests/unit/test_comm_single.py, tests/cluster/test_comm_faults.py,
tests/ranks/tensor_parallel_mpi.py.
"""
from __future__ import annotations

import queue
import threading
import time
import zlib
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from cke_dist.comm import collectives as C
from cke_dist.comm.errors import CommError, CommTimeout
from cke_dist.comm.reduce_ops import check_buffer, check_op

_ALLREDUCE, _BCAST, _BARRIER, _ALLGATHER, _REDUCE_SCATTER, _P2P = 1, 2, 3, 4, 5, 6


class Handle(Future):
    """An op in flight (a concurrent.futures.Future): `wait()` returns its result or raises its error."""

    def __init__(self, what: str = "op"):
        super().__init__()
        self.what = what

    def _finish(self, result=None, error=None):
        if error is None:
            self.set_result(result)
        else:
            self.set_exception(error)

    def is_completed(self) -> bool:
        return self.done()

    def wait(self, timeout: float | None = None):
        try:
            return self.result(timeout)
        except FutureTimeout:
            raise CommTimeout(f"{self.what} not finished after waiting {timeout}s", op=self.what) from None


class Engine:
    """The comm thread (runs queued ops in order) and the send thread (runs sends FIFO) of one process.

    Point-to-point sends are the one exception to "one op at a time": the comm
    thread hands a queued send to the send thread and goes on, so that
    `send(async_op=True)` then `recv` on both ranks of a pair (the pipeline's
    exchange) cannot deadlock on full socket buffers. Sends stay in issue order
    (one FIFO), receives stay in issue order (the comm thread), and a
    collective starts only once every earlier send has finished, so no link
    ever carries two sends or two receives at once.
    """

    def __init__(self, family: "_Family | None" = None):
        self.family = family if family is not None else _Family()
        self.family.engines.append(self)
        self._state = threading.Lock()
        self._exec = threading.Lock()
        self._pending = 0                      # queued or running ops, p2p sends until they finish
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._sends: queue.SimpleQueue = queue.SimpleQueue()
        self._inflight: list[Handle] = []      # p2p sends handed to the send thread (comm thread only)
        self._busy = False                     # an op of this engine is running (see _enter)
        self._worker: threading.Thread | None = None   # started with the first queued op
        self._sender: threading.Thread | None = None
        self._scratch = np.zeros(0, np.uint8)

    @property
    def error(self) -> CommError | None:
        return self.family.error

    @error.setter
    def error(self, e):
        self.family.error = e

    def _start_threads(self):
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="cke-comm", daemon=True)
            self._sender = threading.Thread(target=self._send_loop, name="cke-comm-send", daemon=True)
            self._worker.start()
            self._sender.start()

    def _sending(self) -> bool:
        return any(not h.is_completed() for h in self._inflight)

    def _enter(self):
        """Mark an op running, once no engine that shares links with this one runs one (the world's
        engine shares links with all the others; the others only with the world's)."""
        fam = self.family
        related = fam.engines[1:] if self is fam.engines[0] else fam.engines[:1]
        while True:
            with fam.gate:
                if not any(e._busy or e._sending() for e in related):
                    self._busy = True
                    return
            self._check()
            time.sleep(0.0002)

    # -- ops -----------------------------------------------------------------
    def _check(self):
        if self.error is not None:
            raise CommError(f"communicator unusable after an earlier error: {self.error}",
                            op=self.error.op, group=self.error.group, peer=self.error.peer,
                            host=self.error.host) from self.error

    def _record(self, e):
        if isinstance(e, CommError) and self.error is None:
            self.error = e

    def run(self, fn, what: str, async_op: bool, kind: str = "collective"):
        """Run `fn` in issue order. kind: "collective", "recv", or "send" (a p2p send, see the class note)."""
        self._check()
        if async_op:
            h = Handle(what)
            self._start_threads()
            with self._state:
                self._pending += 1
                self._jobs.put((fn, h, kind))
            return h
        with self._state:
            inline = self._pending == 0   # nothing queued, nothing in flight: run it here
            if inline:
                self._exec.acquire()
            else:
                h = Handle(what)
                self._pending += 1
                self._jobs.put((fn, h, kind))
        if not inline:
            return h.wait()
        try:
            self._enter()
            return fn()
        except CommError as e:
            self._record(e)
            raise
        finally:
            self._busy = False
            self._exec.release()

    def _done(self, h, result=None, error=None):
        if error is not None:
            self._record(error)
        h._finish(result=result, error=error)
        with self._state:
            self._pending -= 1

    def _work(self):
        while True:
            fn, h, kind = self._jobs.get()
            if kind == "send":
                sh = Handle("send")
                self._inflight.append(sh)
                self._sends.put((fn, sh, h))
                continue
            with self._exec:
                if kind == "collective":
                    for sh in self._inflight:
                        try:
                            sh.wait()
                        except BaseException:
                            pass  # reported through the send's own handle
                self._inflight = [sh for sh in self._inflight if not sh.is_completed()]
                try:
                    if self.error is not None:
                        self._check()
                    self._enter()
                    result, error = fn(), None
                except BaseException as e:  # handed to whoever waits on the handle
                    result, error = None, e
                finally:
                    self._busy = False
            self._done(h, result, error)

    # -- sends ---------------------------------------------------------------
    def post(self, link, mvs, tag, deadline_fn) -> Handle:
        """A collective's send: `mvs` to `link` as messages in order, on the send thread."""
        def fn():
            for mv in mvs:
                link.send(mv, tag, deadline_fn())
        h = Handle("send")
        self._start_threads()
        self._sends.put((fn, h, None))
        return h

    def _send_loop(self):
        while True:
            fn, h, op_handle = self._sends.get()
            try:
                if op_handle is not None and self.error is not None:
                    self._check()
                fn()
                h._finish()
                if op_handle is not None:
                    self._done(op_handle)
            except BaseException as e:
                h._finish(error=e)
                if op_handle is not None:
                    self._done(op_handle, error=e)

    def scratch(self, nbytes: int) -> np.ndarray:
        # Only the op holding `_exec` uses it, so one buffer per process suffices.
        if self._scratch.nbytes < nbytes:
            self._scratch = np.empty(max(nbytes, 2 * self._scratch.nbytes), np.uint8)
        return self._scratch[:nbytes]


class _Deadline:
    """A group seen by the collectives with another per-call deadline."""

    def __init__(self, group, timeout):
        self._group, self._timeout = group, timeout

    def __getattr__(self, name):
        return getattr(self._group, name)

    def deadline(self):
        return time.monotonic() + self._timeout

    def post(self, link, mvs, tag):
        return self._group._engine.post(link, mvs, tag, self.deadline)


class _Family:
    """The engines of one process: the first is the world's. They share the first error."""

    def __init__(self):
        self.engines: list[Engine] = []
        self.error: CommError | None = None
        self.gate = threading.Lock()


class Communicator:
    """A group of ranks. `rank`/`size` are within the group; `ranks` are the members' world ranks."""

    def __init__(self, ranks, world_rank, links, engine, hosts, timeout, name, gid, world=None):
        self.ranks = tuple(ranks)
        self.world_rank = world_rank
        self.rank = self.ranks.index(world_rank)
        self.size = len(self.ranks)
        self.hosts = hosts                      # world rank -> host name
        self.timeout = float(timeout)
        self.name = name
        self.gid = gid
        self._links = links                     # world rank -> Link (shared by every group)
        self._engine = engine
        self._seq = 0
        self._world = world or self
        self.stats: dict[str, list[int]] = {}    # op -> [calls, bytes of the caller's buffer]
        self.seconds = 0.0                      # wall time inside blocking calls on this group (metrics)

    def __repr__(self):
        return f"<Communicator {self.name} rank {self.rank}/{self.size}>"

    # -- what collectives.py needs --------------------------------------------
    def link(self, r):
        return self._links[self.ranks[r]]

    def deadline(self):
        return time.monotonic() + self.timeout

    def post(self, link, mvs, tag):
        return self._engine.post(link, mvs, tag, self.deadline)

    def scratch(self, nbytes):
        return self._engine.scratch(nbytes)

    @property
    def links(self):
        """world rank -> Link for this group's peers (which transport serves whom)."""
        return {r: self._links[r] for r in self.ranks if r != self.world_rank}

    # -- plumbing --------------------------------------------------------------
    def _tag(self, opcode, seq=None):
        if seq is None:
            self._seq = (self._seq + 1) & 0xFFFF
            seq = self._seq
        return (self.gid & 0xFFF) << 20 | (opcode & 0xF) << 16 | (seq & 0xFFFF)

    def reset_stats(self):
        self.stats = {}

    def _count(self, opname, nbytes):
        c = self.stats.setdefault(opname, [0, 0])
        c[0] += 1
        c[1] += int(nbytes)

    def _run(self, opname, fn, async_op, kind="collective"):
        def guarded():
            try:
                return fn()
            except CommError as e:
                if e.group is not None:
                    raise
                peer = self.ranks.index(e.peer) if e.peer in self.ranks else e.peer
                raise type(e)(f"{opname} failed: {e.detail}", op=opname,
                              group=f"{self.name} (group rank {self.rank} of {self.size})",
                              peer=e.peer if peer == e.peer else f"{e.peer} (group rank {peer})",
                              host=e.host) from e
        if async_op:
            return self._engine.run(guarded, opname, async_op, kind)
        t0 = time.perf_counter()
        try:
            return self._engine.run(guarded, opname, async_op, kind)
        finally:
            self.seconds += time.perf_counter() - t0

    @staticmethod
    def _check_tag(tag):
        if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)) or not 0 <= tag <= 0xFFFF:
            raise ValueError(f"tag={tag!r}: point-to-point tags are integers in 0..65535 (16 bits of the "
                             f"frame tag; the rest names the group and the op)")
        return int(tag)

    def _check_peer(self, r, what):
        if not isinstance(r, (int, np.integer)) or not 0 <= r < self.size or r == self.rank:
            raise ValueError(f"{what}={r!r} is not another rank of {self.name} (size {self.size}, "
                             f"this rank {self.rank})")
        return int(r)

    # -- collectives -------------------------------------------------------------
    def allreduce(self, buf, op="sum", async_op=False, out=None):
        """Reduce `buf` over the group; in place, or into `out` leaving `buf` untouched. Returns the result array."""
        if out is None:
            flat = check_buffer(buf, "buf", writable=True)
            result = buf
        else:
            src = check_buffer(buf, "buf", writable=False)
            flat = check_buffer(out, "out", writable=True)
            if out.dtype != buf.dtype or out.size != buf.size:
                raise ValueError(f"out ({out.dtype}, {out.size} elements) must match buf "
                                 f"({buf.dtype}, {buf.size} elements)")
            result = out
        check_op(op, flat.dtype)
        tag = self._tag(_ALLREDUCE)
        self._count("allreduce", flat.nbytes)

        def go():
            if out is not None:
                np.copyto(flat, src)
            C.allreduce(self, flat, op, tag)
            return result
        return self._run("allreduce", go, async_op)

    def broadcast(self, buf, root=0, async_op=False):
        flat = check_buffer(buf, "buf", writable=True)
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise ValueError(f"root={root!r} is not a rank of {self.name} (size {self.size})")
        tag = self._tag(_BCAST)
        self._count("broadcast", flat.nbytes)

        def go():
            C.broadcast(self, flat, int(root), tag)
            return buf
        return self._run("broadcast", go, async_op)

    def barrier(self, async_op=False, timeout: float | None = None):
        """Every rank waits for the others; `timeout` (seconds) replaces the group's deadline for this
        barrier alone, for a wait known to be long (e.g. while rank 0 writes a checkpoint)."""
        tag = self._tag(_BARRIER)
        ctx = self if timeout is None else _Deadline(self, float(timeout))
        return self._run("barrier", lambda: C.barrier(ctx, tag), async_op)

    def allgather(self, send, recv, async_op=False):
        """recv (size * send.size elements) = every rank's send, in group rank order."""
        s = check_buffer(send, "send", writable=False)
        r = check_buffer(recv, "recv", writable=True)
        if r.dtype != s.dtype or r.size != self.size * s.size:
            raise ValueError(f"allgather: recv must be {s.dtype} with size*send.size = "
                             f"{self.size * s.size} elements, got {r.dtype} with {r.size}")
        tag = self._tag(_ALLGATHER)
        self._count("allgather", r.nbytes)

        def go():
            C.allgather(self, s, r, tag)
            return recv
        return self._run("allgather", go, async_op)

    def reduce_scatter(self, send, recv, op="sum", async_op=False):
        """recv on group rank r = op over ranks of send's r-th block of recv.size elements."""
        s = check_buffer(send, "send", writable=False)
        r = check_buffer(recv, "recv", writable=True)
        if r.dtype != s.dtype or s.size != self.size * r.size:
            raise ValueError(f"reduce_scatter: send must hold size*recv.size = {self.size * r.size} "
                             f"elements of recv's dtype {r.dtype}, got {s.dtype} with {s.size}")
        check_op(op, s.dtype)
        tag = self._tag(_REDUCE_SCATTER)
        self._count("reduce_scatter", s.nbytes)

        def go():
            C.reduce_scatter(self, s, r, op, tag)
            return recv
        return self._run("reduce_scatter", go, async_op)

    def send(self, buf, dst, tag=0, async_op=False):
        """Send `buf` to group rank `dst`; the matching `recv` must expect the same length and tag."""
        flat = check_buffer(buf, "buf", writable=False)
        tag = self._check_tag(tag)
        dst = self._check_peer(dst, "dst")
        t = self._tag(_P2P, seq=tag)
        self._count("send", flat.nbytes)

        def go():
            self.link(dst).send(memoryview(flat).cast("B"), t, self.deadline())
        return self._run("send", go, async_op, kind="send")

    def recv(self, buf, src, tag=0, async_op=False):
        """Receive exactly buf.nbytes from group rank `src` into `buf`."""
        flat = check_buffer(buf, "buf", writable=True)
        tag = self._check_tag(tag)
        src = self._check_peer(src, "src")
        t = self._tag(_P2P, seq=tag)
        self._count("recv", flat.nbytes)

        def go():
            self.link(src).recv(memoryview(flat).cast("B"), t, self.deadline())
            return buf
        return self._run("recv", go, async_op, kind="recv")

    # -- groups ------------------------------------------------------------------
    def split(self, ranks):
        """A sub-group of these group ranks (in the order given), reusing this group's connections.

        Needs no communication; ranks outside `ranks` get None. A split of the world gets an
        engine of its own (its ops progress independently of other groups'); a split of a
        sub-group shares its parent's engine (its ops are ordered with the parent's).
        """
        ranks = [int(r) for r in ranks]
        if not ranks or len(set(ranks)) != len(ranks) or any(not 0 <= r < self.size for r in ranks):
            raise ValueError(f"split({ranks}): need distinct ranks in 0..{self.size - 1} of {self.name}")
        members = [self.ranks[r] for r in ranks]
        if self.world_rank not in members:
            return None
        gid = (zlib.crc32(np.asarray(members, np.int64).tobytes()) % 0xFFF) + 1  # world is 0
        name = "group[" + ",".join(map(str, members)) + "]"
        engine = Engine(self._engine.family) if self is self._world else self._engine
        return Communicator(members, self.world_rank, self._links, engine, self.hosts,
                            self.timeout, name, gid, world=self._world)

    def close(self):
        """Close every link (world only; sub-groups share them); a later init() makes a new world."""
        if self is self._world:
            for link in self._links.values():
                link.close()
            listener = getattr(self, "_listener", None)
            if listener is not None:
                listener.close()
            on_close = getattr(self, "_on_close", None)
            if on_close is not None:
                on_close()
