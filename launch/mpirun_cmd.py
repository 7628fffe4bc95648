"""Turn a cluster config (cluster-configs/*.toml) into the mpiexec command line that runs a job on it.

    python launch/mpirun_cmd.py cluster-configs/two-hosts.toml -- cke-dist train examples/shakespeare_char.toml
    python launch/mpirun_cmd.py cluster-configs/localhost.toml --exec -- cke-dist train

Prints the command (or runs it with --exec). The config names the hosts and
their slots, the network interface the ranks talk over, the transport and the
grid; the grid must use every slot. Settings travel as -genv variables that
cke_dist.comm reads (CKE_TRANSPORT, CKE_COMM_INTERFACE, CKE_COMM_TIMEOUT), plus
one BLAS/numba thread count per rank. A `cke-dist train` job also gets the grid and
the thread count as `--set parallel.tp/pp` and `--set train.threads` right after
`train` (so the job trains on the grid the config names; a --set of the user's,
later on the line, still wins).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tomllib
from pathlib import Path

KEYS = {"hosts", "interface", "transport", "timeout", "threads_per_rank", "grid"}
GRID_KEYS = {"dp", "pp", "tp"}
TRANSPORTS = ("auto", "tcp", "shm", "rdma")


def load(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such cluster config") from None
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"{path}: not valid TOML: {e}") from None
    unknown = set(cfg) - KEYS
    if unknown:
        raise SystemExit(f"{path}: unknown keys {sorted(unknown)}; valid keys: {sorted(KEYS)}")
    hosts = cfg.get("hosts")
    if not hosts or not all(isinstance(h, dict) and isinstance(h.get("name"), str)
                            and isinstance(h.get("slots"), int) and h["slots"] > 0 for h in hosts):
        raise SystemExit(f"{path}: 'hosts' must be a list of {{ name = \"...\", slots = N }} with N >= 1")
    if cfg.get("transport", "auto") not in TRANSPORTS:
        raise SystemExit(f"{path}: transport = {cfg['transport']!r}; use one of {', '.join(TRANSPORTS)}")
    grid = cfg.get("grid", {})
    if set(grid) - GRID_KEYS:
        raise SystemExit(f"{path}: unknown grid keys {sorted(set(grid) - GRID_KEYS)}; valid: dp, pp, tp")
    world = sum(h["slots"] for h in hosts)
    pp, tp = grid.get("pp", 1), grid.get("tp", 1)
    dp = grid.get("dp", world // (pp * tp) if world % (pp * tp) == 0 else 0)
    if dp * pp * tp != world:
        raise SystemExit(f"{path}: grid dp*pp*tp = {dp}*{pp}*{tp} does not use the {world} slots of the hosts")
    return cfg


def _mpiexec() -> str:
    """The mpiexec of this Python's environment (the mpich wheel puts it beside python), else PATH's."""
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else (shutil.which("mpiexec") or "mpiexec")


def command(cfg: dict, job: list[str]) -> list[str]:
    """The mpiexec (MPICH hydra) command line: ranks fill hosts in order, so tp neighbours share a host."""
    hosts = cfg["hosts"]
    world = sum(h["slots"] for h in hosts)
    threads = str(cfg.get("threads_per_rank", 1))
    env = {"CKE_TRANSPORT": cfg.get("transport", "auto"),
           "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads}
    if "interface" in cfg:
        env["CKE_COMM_INTERFACE"] = cfg["interface"]
    if "timeout" in cfg:
        env["CKE_COMM_TIMEOUT"] = str(cfg["timeout"])
    cmd = [_mpiexec(), "-n", str(world),
           "-hosts", ",".join(f"{h['name']}:{h['slots']}" for h in hosts)]
    for k, v in env.items():
        cmd += ["-genv", k, v]
    return cmd + with_grid(job, cfg.get("grid", {}), threads)


def with_grid(job: list[str], grid: dict, threads: str) -> list[str]:
    """A `cke-dist train` job (or `python -m cke_dist.cli train`) with the config's grid and threads set."""
    for i in range(1, len(job)):
        if job[i] == "train" and (Path(job[i - 1]).name == "cke-dist" or job[i - 1] == "cke_dist.cli"):
            sets = [f"parallel.tp={grid.get('tp', 1)}", f"parallel.pp={grid.get('pp', 1)}", f"train.threads={threads}"]
            return job[:i + 1] + [x for s in sets for x in ("--set", s)] + job[i + 1:]
    return job


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="mpirun_cmd.py")
    p.add_argument("cluster_config")
    p.add_argument("--exec", action="store_true", help="run the command instead of printing it")
    args = p.parse_args(argv[:split])
    job = argv[split + 1:]
    if not job:
        raise SystemExit("nothing to run after '--'")
    cmd = command(load(args.cluster_config), job)
    if args.exec:
        os.execvp(cmd[0], cmd)
    print(shlex.join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
