"""Bootstrap: MPI finds the ranks, then every peer pair gets its own Link; MPI carries no data after.

Rules this module keeps:
- MPI is only the rendezvous: one broadcast (the job token, drawn by rank 0),
  one allgather of a dict of per-rank facts (host, pid, TCP endpoint, what
  RDMA this rank offers), and the few rounds shm/rdma set-up needs to swap
  segment names and queue-pair numbers and agree on failures.
- Which transport serves each peer pair is `select.plan` (a pure function of
  the gathered facts, so every rank agrees); `select.open_links` opens shm and
  rdma links and moves pairs whose links fail to come up to tcp (with `auto`).
- Listening sockets bind to the job's address: `interface` (name or address),
  else the host name's address; loopback only when every rank is on one host.
- Settings: arguments win, then CKE_TRANSPORT, CKE_COMM_INTERFACE,
  CKE_COMM_TIMEOUT (seconds a blocking call may go without progress; also how long
  a peer host may leave TCP unacknowledged), CKE_COMM_QUIET (1: rank 0 does not
  print the transport plan at start), CKE_COMM_HOSTNAME (test-only host identity override).
- Under srun: MPI must see srun's tasks as one world (srun --mpi=pmi2 for the mpich wheel); a size-1
  world in a step of several tasks (SLURM_STEP_NUM_TASKS) is refused, since every task would run the whole
  job alone.
- Aborting: with `abort_on_error` (the default under mpiexec) a CommError that
  goes uncaught, or one that was raised at all before the process exits, ends
  the whole job through `MPI.COMM_WORLD.Abort(1)` after printing the error. If
  Abort has not ended this process ABORT_GRACE_S later (the launcher cut off),
  SIGALRM does.
Tests: tests/unit/test_comm_single.py, tests/ranks/comm_collectives_mpi.py, tests/cluster/test_comm_faults.py.
"""
from __future__ import annotations

import atexit
import faulthandler
import ipaddress
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time

from cke_dist.comm import select, tcp
from cke_dist.comm.errors import CommError
from cke_dist.comm.group import Communicator, Engine

log = logging.getLogger("cke_dist.comm")

DEFAULT_TIMEOUT_S = 300.0
# Seconds MPI_Abort gets to end the job before this process is ended by the kernel (SIGALRM, see _abort).
ABORT_GRACE_S = 4
# TCP connections per peer pair; messages >= tcp.STRIPE_MIN are cut across them.
DEFAULT_TCP_STREAMS = 1
_WORLD: Communicator | None = None


def _setting(value, env, default=None):
    if value is not None:
        return value
    v = os.environ.get(env)
    return v if v not in (None, "") else default


def _check_addresses(facts):
    counts = {f["tcp_streams"] for f in facts}
    if len(counts) > 1:
        raise ValueError(f"ranks disagree on CKE_TCP_STREAMS ({sorted(counts)}); set the same value on every rank")
    hosts = {f["host"] for f in facts}
    if len(hosts) == 1:
        return
    for r, f in enumerate(facts):
        # an interface named on purpose is trusted (tests pose as several hosts on one machine)
        if not f.get("tcp_interface") and ipaddress.ip_address(f["tcp"][0]).is_loopback:
            raise ValueError(f"rank {r} on host {f['host']!r} listens on loopback {f['tcp'][0]} but the job spans "
                             f"{len(hosts)} hosts ({', '.join(sorted(hosts))}): its host name resolves to "
                             f"loopback. Set interface= (or CKE_COMM_INTERFACE) to the network interface name "
                             f"or address the hosts share.")


def init(transport=None, interface=None, timeout=None, abort_on_error=True, quiet=None) -> Communicator:
    """The world communicator: under mpiexec/srun, or a size-1 world in one plain process.

    Rank 0 prints to stderr which transport serves which pairs and why (one line per choice)
    unless quiet (or CKE_COMM_QUIET=1). Calling it again returns the same world.
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    transport = select.resolve_transport(transport)
    try:
        timeout = float(_setting(timeout, "CKE_COMM_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        raise ValueError(f"timeout / CKE_COMM_TIMEOUT={os.environ.get('CKE_COMM_TIMEOUT')!r} is not a number "
                         f"of seconds") from None
    if not timeout > 0:
        raise ValueError(f"timeout={timeout}: must be a positive number of seconds")
    interface = _setting(interface, "CKE_COMM_INTERFACE")
    streams = _setting(None, "CKE_TCP_STREAMS", str(DEFAULT_TCP_STREAMS))
    if not streams.isdigit() or not 1 <= int(streams) <= 16:
        raise ValueError(f"CKE_TCP_STREAMS={streams!r}: use a whole number of TCP streams per peer pair, 1..16")
    streams = int(streams)

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    step_tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
    if size == 1 and step_tasks.isdigit() and int(step_tasks) > 1:
        raise RuntimeError(f"srun started {step_tasks} tasks but MPI sees each as a world of 1 (no PMI between "
                           f"srun and MPI): run srun --mpi=pmi2 (what the mpich wheel's MPI speaks), or ask for "
                           f"MpiDefault=pmi2 in slurm.conf")
    host = _setting(None, "CKE_COMM_HOSTNAME", socket.gethostname())
    token = comm.bcast(secrets.token_bytes(16) if rank == 0 else None, root=0)
    deadline = time.monotonic() + timeout

    facts = {"host": host, "pid": os.getpid(), "rdma": select.local_facts(transport)["rdma"]}
    listener = None
    if size > 1:
        listener = tcp.Listener(tcp.resolve_address(interface), token, rank, size, streams=streams,
                                handshake_s=min(5.0, timeout))
        facts["tcp"] = listener.endpoint
        facts["tcp_streams"] = streams
        facts["tcp_interface"] = interface
    facts = comm.allgather(facts)
    hosts = [f["host"] for f in facts]
    links, plan = {}, None
    if size > 1:
        _check_addresses(facts)
        links, plan = select.open_links(
            comm, select.plan(transport, facts),
            lambda peers: tcp.open_links(rank, peers, facts, token, listener, deadline, liveness_s=timeout),
            rdma_probe=facts[rank]["rdma"])
        listener.expect([])  # no pair left to accept (tcp.open_links is skipped when no pair uses tcp)
        show = _setting(quiet, "CKE_COMM_QUIET", "0") not in (True, "1", "true", "yes")
        if rank == 0 and show:
            sys.stderr.write("".join(f"cke-dist comm: {line}\n" for line in plan.describe()))
            sys.stderr.flush()

    engine = Engine()
    world = Communicator(range(size), rank, links, engine, hosts, timeout, "world", 0)
    world.transport = transport
    world.plan = plan
    world._on_close = _forget_world
    world.facts = facts
    world._listener = listener
    if abort_on_error and size > 1:
        _install_abort(engine)
    _WORLD = world
    return world


_aborting = False


def _forget_world():
    """world.close() ran: the next init() builds a new world rather than returning the closed one."""
    global _WORLD
    _WORLD = None


def _abort(err):
    global _aborting
    if _aborting:  # the excepthook and the exit rule may both fire
        return
    _aborting = True
    try:
        sys.stderr.write(f"cke-dist: aborting the MPI job after a communication error: {err}\n")
        sys.stderr.flush()
        time.sleep(0.2)  # Abort kills the job at once: give mpiexec a moment to forward the message
    finally:
        from mpi4py import MPI

        # MPI_Abort can leave this process hanging when the launcher is out of reach (this host's cable pulled):
        # seen stuck in the exit that follows it, inside Python's finalization, which also stops faulthandler's
        # watchdog thread. So the kernel ends it: SIGALRM's default action terminates the process whatever it is
        # doing. Only if the application has taken SIGALRM, faulthandler's watchdog (_exit(1)) is the fallback.
        if signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None):
            signal.alarm(ABORT_GRACE_S)
        else:
            faulthandler.dump_traceback_later(ABORT_GRACE_S, exit=True)
        MPI.COMM_WORLD.Abort(1)


def _install_abort(engine):
    """Uncaught CommError (any thread) -> print, Abort. Any CommError seen before exit -> Abort at exit.

    The exit rule matters when a caller catches the error and returns normally:
    without it MPI_Finalize could wait on ranks that are stuck in the op.
    """
    prev_hook, prev_thread_hook = sys.excepthook, threading.excepthook

    def hook(t, v, tb):
        prev_hook(t, v, tb)
        if isinstance(v, CommError):
            _abort(v)

    def thread_hook(args):
        prev_thread_hook(args)
        if isinstance(args.exc_value, CommError):
            _abort(args.exc_value)

    sys.excepthook = hook
    threading.excepthook = thread_hook
    atexit.register(lambda: engine.error is not None and _abort(engine.error))
