"""Turn a cluster config (cluster-configs/*.toml) into the mpiexec command line or Slurm batch script of a job.

    cke-dist launch cluster-configs/two-hosts.toml -- cke-dist train examples/shakespeare_char.toml
    cke-dist launch cluster-configs/localhost.toml --exec -- cke-dist train
    cke-dist launch cluster-configs/slurm.toml --slurm [--submit] -- cke-dist train

(`python launch/mpirun_cmd.py ...`, the older spelling, runs the same.)

Prints the command (or runs it with --exec). The config names the hosts and
their slots, the network interface the ranks talk over, the transport and the
grid; the grid must use every slot. Settings travel as -genv variables that
cke_dist.comm reads (CKE_TRANSPORT, CKE_COMM_INTERFACE, CKE_COMM_TIMEOUT), plus
one BLAS/numba thread count per rank. A `cke-dist train` job also gets the grid and
the thread count as `--set parallel.tp/pp` and `--set train.threads` right after
`train` (so the job trains on the grid the config names; a --set of the user's,
later on the line, still wins).

A Slurm config has a [slurm] table (nodes, ntasks_per_node, partition, time,
account, job_name, mpi, sbatch) instead of hosts; --slurm prints an sbatch
script whose `srun --mpi=pmi2` starts the ranks (Slurm's PMI-2 server is what
the mpich wheel's MPI talks to), one CPU per thread of threads_per_rank, the same
settings exported; --submit pipes it to sbatch.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from cke_kernels import THREAD_VARS

KEYS = {"hosts", "slurm", "interface", "transport", "timeout", "threads_per_rank", "grid"}
GRID_KEYS = {"dp", "pp", "tp"}
TRANSPORTS = ("auto", "tcp", "shm", "rdma")
# [slurm] key -> (type, required); each becomes the sbatch option of the same name (with - for _)
SLURM_KEYS = {"nodes": (int, True), "ntasks_per_node": (int, True), "partition": (str, False),
              "time": (str, False), "account": (str, False), "job_name": (str, False),
              "mpi": (str, False), "sbatch": (list, False)}


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
    if ("hosts" in cfg) == ("slurm" in cfg):
        raise SystemExit(f"{path}: name either 'hosts' (run by mpiexec) or a [slurm] table (an sbatch script), "
                         f"not {'both' if 'hosts' in cfg else 'neither'}")
    if "hosts" in cfg:
        hosts = cfg["hosts"]
        if not hosts or not all(isinstance(h, dict) and isinstance(h.get("name"), str)
                                and isinstance(h.get("slots"), int) and h["slots"] > 0 for h in hosts):
            raise SystemExit(f"{path}: 'hosts' must be a list of {{ name = \"...\", slots = N }} with N >= 1")
    else:
        _check_slurm(path, cfg["slurm"])
    if cfg.get("transport", "auto") not in TRANSPORTS:
        raise SystemExit(f"{path}: transport = {cfg['transport']!r}; use one of {', '.join(TRANSPORTS)}")
    threads = cfg.get("threads_per_rank", 1)
    if type(threads) is not int or threads < 1:
        raise SystemExit(f"{path}: threads_per_rank = {threads!r}; use a whole number >= 1")
    grid = cfg.get("grid", {})
    if set(grid) - GRID_KEYS:
        raise SystemExit(f"{path}: unknown grid keys {sorted(set(grid) - GRID_KEYS)}; valid: dp, pp, tp")
    world = world_size(cfg)
    pp, tp = grid.get("pp", 1), grid.get("tp", 1)
    dp = grid.get("dp", world // (pp * tp) if world % (pp * tp) == 0 else 0)
    if dp * pp * tp != world:
        slots = "slots of the hosts" if "hosts" in cfg else "tasks of [slurm] (nodes * ntasks_per_node)"
        raise SystemExit(f"{path}: grid dp*pp*tp = {dp}*{pp}*{tp} does not use the {world} {slots}")
    return cfg


def _check_slurm(path: str, slurm) -> None:
    if not isinstance(slurm, dict):
        raise SystemExit(f"{path}: 'slurm' must be a table ([slurm] with nodes = N, ntasks_per_node = M, ...)")
    unknown = set(slurm) - set(SLURM_KEYS)
    if unknown:
        raise SystemExit(f"{path}: unknown [slurm] keys {sorted(unknown)}; valid keys: {sorted(SLURM_KEYS)}")
    for key, (kind, required) in SLURM_KEYS.items():
        if key not in slurm:
            if required:
                raise SystemExit(f"{path}: [slurm] needs {key} = N (a whole number >= 1)")
            continue
        v = slurm[key]
        if kind is int and not (type(v) is int and v >= 1):
            raise SystemExit(f"{path}: [slurm] {key} = {v!r}; use a whole number >= 1")
        if kind is str and not (isinstance(v, str) and v and "\n" not in v):
            raise SystemExit(f"{path}: [slurm] {key} = {v!r}; use a non-empty one-line string")
        if kind is list and not (isinstance(v, list) and all(isinstance(o, str) and o.startswith("-")
                                                             and "\n" not in o for o in v)):
            raise SystemExit(f"{path}: [slurm] sbatch = {v!r}; use a list of sbatch options like [\"--exclusive\"]")


def world_size(cfg: dict) -> int:
    if "slurm" in cfg:
        return cfg["slurm"]["nodes"] * cfg["slurm"]["ntasks_per_node"]
    return sum(h["slots"] for h in cfg["hosts"])


def _mpiexec() -> str:
    """The mpiexec of this Python's environment (the mpich wheel puts it beside python), else PATH's."""
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else (shutil.which("mpiexec") or "mpiexec")


def _env(cfg: dict) -> dict:
    """What every rank needs in its environment: cke_dist.comm's settings and one thread count for each library."""
    threads = str(cfg.get("threads_per_rank", 1))
    env = {"CKE_TRANSPORT": cfg.get("transport", "auto"), **dict.fromkeys(THREAD_VARS, threads)}
    if "interface" in cfg:
        env["CKE_COMM_INTERFACE"] = cfg["interface"]
    if "timeout" in cfg:
        env["CKE_COMM_TIMEOUT"] = str(cfg["timeout"])
    return env


def command(cfg: dict, job: list[str]) -> list[str]:
    """The mpiexec (MPICH hydra) command line: ranks fill hosts in order, so tp neighbours share a host."""
    hosts = cfg["hosts"]
    cmd = [_mpiexec(), "-n", str(world_size(cfg)),
           "-hosts", ",".join(f"{h['name']}:{h['slots']}" for h in hosts)]
    for k, v in _env(cfg).items():
        cmd += ["-genv", k, v]
    return cmd + with_grid(job, cfg.get("grid", {}), str(cfg.get("threads_per_rank", 1)))


def slurm_script(cfg: dict, job: list[str], source: str = "") -> str:
    """An sbatch script: the allocation as #SBATCH lines, the settings exported, srun starting every rank.

    Slurm fills a node's tasks before the next (block distribution), so tp neighbours share a node as
    under mpiexec. --cpus-per-task is repeated on the srun line because srun 22.05 ignores the
    allocation's SLURM_CPUS_PER_TASK; --kill-on-bad-exit ends the other ranks when one dies.
    """
    slurm = cfg["slurm"]
    threads = cfg.get("threads_per_rank", 1)
    opts = {"job-name": slurm.get("job_name", "cke-dist"), "nodes": slurm["nodes"],
            "ntasks-per-node": slurm["ntasks_per_node"], "cpus-per-task": threads}
    for key in ("partition", "time", "account"):
        if key in slurm:
            opts[key] = slurm[key]
    lines = ["#!/bin/bash"] + [f"#SBATCH --{k}={v}" for k, v in opts.items()]
    lines += [f"#SBATCH {o}" for o in slurm.get("sbatch", [])]
    lines.append("# made by cke-dist launch" + (f" from {source}" if source else ""))
    lines += [f"export {k}={shlex.quote(v)}" for k, v in _env(cfg).items()]
    srun = ["srun", f"--mpi={slurm.get('mpi', 'pmi2')}", f"--cpus-per-task={threads}", "--kill-on-bad-exit=1"]
    lines.append(shlex.join(srun + with_grid(job, cfg.get("grid", {}), str(threads))))
    return "\n".join(lines) + "\n"


def with_grid(job: list[str], grid: dict, threads: str) -> list[str]:
    """A `cke-dist train` job (or `python -m cke_dist.cli train`) with the config's grid and threads set."""
    for i in range(1, len(job)):
        if job[i] == "train" and (Path(job[i - 1]).name == "cke-dist" or job[i - 1] == "cke_dist.cli"):
            sets = [f"parallel.tp={grid.get('tp', 1)}", f"parallel.pp={grid.get('pp', 1)}", f"train.threads={threads}"]
            return job[:i + 1] + [x for s in sets for x in ("--set", s)] + job[i + 1:]
    return job


def main(argv=None, prog: str = "cke-dist launch") -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("cluster_config")
    p.add_argument("--exec", action="store_true", help="run the command instead of printing it")
    p.add_argument("--slurm", action="store_true", help="print an sbatch script (the config has a [slurm] table)")
    p.add_argument("--submit", action="store_true", help="with --slurm: submit the script with sbatch")
    args = p.parse_args(argv[:split])
    job = argv[split + 1:]
    if not job:
        raise SystemExit("nothing to run after '--'")
    if args.submit and not args.slurm:
        raise SystemExit("--submit goes with --slurm (it hands the sbatch script to sbatch)")
    if args.exec and args.slurm:
        raise SystemExit("--exec runs mpiexec; for Slurm use --slurm --submit")
    cfg = load(args.cluster_config)
    if args.slurm != ("slurm" in cfg):
        raise SystemExit(f"{args.cluster_config}: has no [slurm] table; --slurm needs one" if args.slurm else
                         f"{args.cluster_config}: a Slurm config (a [slurm] table, no hosts): add --slurm")
    if args.slurm:
        script = slurm_script(cfg, job, args.cluster_config)
        if not args.submit:
            print(script, end="")
            return 0
        if not shutil.which("sbatch"):
            raise SystemExit("sbatch not found: --submit runs on a Slurm login node (or print the script)")
        # sbatch reads the script from stdin; its SBATCH_* variables and any #SBATCH lines apply as usual
        return subprocess.run(["sbatch"], input=script, text=True).returncode
    cmd = command(cfg, job)
    if args.exec:
        os.execvp(cmd[0], cmd)
    print(shlex.join(cmd))
    return 0
