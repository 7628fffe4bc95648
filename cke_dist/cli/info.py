"""`cke-dist info`: what this machine (or this mpiexec job) offers cke-dist.

Prints the MPI library, the RDMA devices and ports found (or why none), the pyverbs version, the shared-memory
directory, which transport `auto` (or the one asked for) picks for every peer pair and why, and the thread
settings. Under mpiexec every rank contributes its facts and rank 0 prints; alone it describes one host.
Exit status 1 when the transport asked for (--transport / CKE_TRANSPORT other than auto) cannot work here.
Imports no numba or torch. Tests: tests/integration/test_info.py.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys

from cke_kernels import THREAD_VARS


def add_arguments(parser) -> None:
    parser.add_argument("--transport", default=None,
                        help="transport to evaluate: auto | tcp | shm | rdma (default: CKE_TRANSPORT, else auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the grid to describe (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the grid to describe (default 1)")


def _threads() -> dict:
    out = {v: os.environ.get(v) for v in THREAD_VARS}
    out["cpu_count"] = os.cpu_count()
    try:
        out["cpus_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        out["cpus_usable"] = None
    try:
        from threadpoolctl import threadpool_info

        out["blas"] = [{"library": i.get("internal_api"), "threads": i.get("num_threads")}
                       for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        out["blas"] = None
    return out


def _shm() -> dict:
    from cke_dist.comm import shm

    try:
        usage = shutil.disk_usage(shm.SHM_DIR)
        return {"dir": shm.SHM_DIR, "free_bytes": usage.free}
    except OSError as e:
        return {"dir": shm.SHM_DIR, "error": str(e)}


def _grid(size, pp, tp, plan) -> dict:
    """The dp x pp x tp grid over `size` ranks and the transport(s) inside each of its groups."""
    from cke_dist.parallel.grid import ProcessGrid

    if pp < 1 or tp < 1 or size % (pp * tp):
        return {"error": f"tp={tp} x pp={pp} does not divide the world of {size} rank(s)"}
    out = {"dp": size // (pp * tp), "pp": pp, "tp": tp, "groups": {}}
    for axis, groups in ProcessGrid.axis_groups(size, pp, tp).items():
        rows = []
        for g in groups:
            kinds = sorted({plan.kind[(min(a, b), max(a, b))] for a in g for b in g if a != b}) if plan else []
            rows.append({"ranks": list(g), "transports": kinds})
        out["groups"][axis] = rows
    return out


def gather(transport=None, tp=1, pp=1) -> dict:
    """Everything `info` reports, as plain data (collective under mpiexec: every rank must call it)."""
    from mpi4py import MPI

    from cke_dist.comm import select
    from cke_dist.comm.errors import TransportUnavailable

    comm = MPI.COMM_WORLD
    requested = select.resolve_transport(transport)
    facts = select.local_facts("auto" if requested == "auto" else requested)
    if requested != "rdma" and requested != "auto":
        facts["rdma"] = __import__("cke_dist.comm.rdma", fromlist=["probe"]).probe()  # show devices anyway
    all_facts = comm.allgather(facts)
    info = {
        "python": platform.python_version(),
        "mpi": {"library": " ".join(MPI.Get_library_version().split("\n")[0].split()),
                "mpi4py": __import__("mpi4py").__version__, "world_size": comm.Get_size()},
        "rdma": facts["rdma"],
        "shm": _shm(),
        "threads": _threads(),
        "hosts": [f["host"] for f in all_facts],
        "transport": {"requested": requested},
    }
    t = info["transport"]
    plan = None
    if comm.Get_size() > 1:
        try:
            plan = select.plan(requested, all_facts)
            t["ok"], t["plan"] = True, plan.describe()
        except TransportUnavailable as e:
            t["ok"], t["error"] = False, str(e)
    else:
        # one process: say what auto would do with peers on this host and on other hosts like this one
        rdma = facts["rdma"]
        remote = (f"rdma when every rank has a usable device ({rdma['reason']} here), else tcp" if rdma["ok"]
                  else f"tcp ({rdma['reason']} here)")
        t["ok"] = True
        t["plan"] = ["single process: no peers. Under mpiexec, transport=auto takes shm for peers on this host; "
                     f"for peers on other hosts: {remote}"]
        if requested == "rdma" and not rdma["ok"]:
            t["ok"], t["error"] = False, (f"transport=rdma cannot work here: {rdma['reason']}. Checked: "
                                          + "; ".join(rdma["checked"]))
    info["grid"] = _grid(comm.Get_size(), pp, tp, plan)
    return info


def _print_text(info) -> None:
    p = print
    p(f"cke-dist on Python {info['python']}, {platform.machine()}")
    m = info["mpi"]
    p(f"MPI library:   {m['library']} (mpi4py {m['mpi4py']}); world size {m['world_size']}")
    r = info["rdma"]
    p(f"pyverbs:       {r['version'] or 'not installed'}")
    why = r["reason"][len("rdma: "):] if r["reason"].startswith("rdma: ") else r["reason"]
    p(f"RDMA:          {'usable: ' + why if r['ok'] else why}")
    for line in r["checked"]:
        p(f"  checked: {line}")
    for dev in r["devices"]:
        if dev.get("error"):
            p(f"  device {dev['name']}: cannot open ({dev['error']})")
        for port in dev["ports"]:
            extra = f", GID[{port['gid_index']}] {port['gid']}" if "gid" in port else ""
            p(f"  device {dev['name']} port {port['port']}: {port['state']}, {port['link_layer']}, "
              f"LID {port['lid']}{extra}")
    s = info["shm"]
    p(f"shm:           {s['dir']}: " + (f"{s['free_bytes'] / 2**30:.1f} GiB free" if "free_bytes" in s
                                        else s["error"]))
    t = info["transport"]
    p(f"transport:     {t['requested']}" + ("" if t["ok"] else " -- UNAVAILABLE"))
    for line in t.get("plan", []):
        p(f"  {line}")
    if not t["ok"]:
        p(f"  {t['error']}")
    g = info["grid"]
    if "error" in g:
        p(f"grid:          {g['error']}")
    else:
        p(f"grid:          dp={g['dp']} x pp={g['pp']} x tp={g['tp']}")
        for axis, rows in g["groups"].items():
            if len(rows[0]["ranks"]) > 1:
                p(f"  {axis} groups: " + ", ".join(f"{r['ranks']} over {'+'.join(r['transports']) or '?'}"
                                                   for r in rows))
    th = info["threads"]
    env = ", ".join(f"{v}={th[v] if th[v] is not None else 'unset'}" for v in THREAD_VARS)
    p(f"threads:       {env}; {th['cpus_usable']} of {th['cpu_count']} CPUs usable")
    if th["blas"]:
        p("  BLAS: " + ", ".join(f"{b['library']} {b['threads']} thread(s)" for b in th["blas"]))


def run(args) -> int:
    from mpi4py import MPI

    try:
        info = gather(args.transport, tp=args.tp, pp=args.pp)
    except ValueError as e:  # a bad transport name
        print(f"cke-dist info: {e}", file=sys.stderr)
        return 2
    if MPI.COMM_WORLD.Get_rank() == 0:
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            _print_text(info)
        sys.stdout.flush()
    return 0 if info["transport"]["ok"] and "error" not in info["grid"] else 1
