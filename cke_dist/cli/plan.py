"""`cke-dist plan [CONFIG.toml] [--set section.key=value ...] --ranks N`: the memory plan of a training
job (cke_dist/train/plan.py): per-rank parameters, gradients, optimizer state and activations of each
layout of N ranks, which fit, and the one to run."""
import sys
from pathlib import Path

from cke_dist.formats.hf import HFFormatError
from cke_dist.model.layout import param_specs
from cke_dist.train.config import ConfigError
from cke_dist.train.loop import model_config, resolve_config
from cke_dist.train.plan import plan

MiB = 2**20


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="TOML config of the job (default: the built-in one); its model, "
                                                  "data.batch_size, seq_len, grad_accum, schedule and optimizer count")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set model.init_from=DIR")
    parser.add_argument("--ranks", type=int, default=1, help="ranks of the job (default 1)")
    parser.add_argument("--ranks-per-host", type=int, default=0, help="ranks on each host (default: all on one)")
    parser.add_argument("--cluster", metavar="CLUSTER.toml",
                        help="a cluster config of `cke-dist launch`: its ranks, and the most ranks one host runs")
    parser.add_argument("--host-memory", type=float, default=0.0,
                        help="GiB of memory per host (default: this machine's MemTotal)")
    parser.add_argument("--all", action="store_true", help="every candidate, not only those that fit")


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


def run(args) -> int:
    if args.cluster:   # launch's reader: its one-line errors
        from cke_dist.cli.launch import load, world_size
        cluster = load(args.cluster)
        args.ranks = world_size(cluster)
        args.ranks_per_host = (cluster["slurm"]["ntasks_per_node"] if "slurm" in cluster
                               else max(h["slots"] for h in cluster["hosts"]))
    try:
        if args.ranks < 1 or args.ranks_per_host < 0 or args.host_memory < 0:
            raise ConfigError("--ranks must be >= 1, --ranks-per-host and --host-memory >= 0")
        cfg, _ = resolve_config(args.config, args.overrides, None)
        config = model_config(cfg)
    except (ConfigError, HFFormatError, FileNotFoundError) as e:
        print(f"cke-dist plan: error: {e}", file=sys.stderr)
        return 2
    per_host = args.ranks_per_host or args.ranks
    host = int(args.host_memory * 2**30) if args.host_memory else _mem_total()
    rank_memory = host // per_host
    states = {"adamw": 2, "sgd": 1 if cfg.optim.momentum else 0}.get(cfg.optim.name, 2)
    estimates, chosen = plan(config, args.ranks, rank_memory, cfg.data.batch_size, cfg.data.seq_len,
                             cfg.data.grad_accum, cfg.parallel.schedule, states)
    n_params = sum(s.size for s in param_specs(config))
    print(f"cke-dist plan: {n_params / 1e6:.1f}M parameters, {args.ranks} rank(s), "
          f"{per_host} per host, {rank_memory / 2**30:.1f} GiB per rank; micro-batch {cfg.data.batch_size} rows "
          f"(over dp) x {cfg.data.seq_len} tokens, {cfg.data.grad_accum} per step, {cfg.optim.name}")
    print(f"{'layout':<44} {'params':>8} {'grads':>8} {'optim':>8} {'activ.':>8} {'other':>8} {'total MiB':>10}  fits")
    shown = sorted(estimates, key=lambda e: e.total)
    for e in shown:
        if not (e.fits or args.all):
            continue
        mark = "  <- pick" if e is chosen else ""
        print(f"{str(e.layout):<44} {e.params / MiB:8.0f} {e.grads / MiB:8.0f} {e.optimizer / MiB:8.0f} "
              f"{e.activations / MiB:8.0f} {e.other / MiB:8.0f} {e.total / MiB:10.0f}  "
              f"{'yes' if e.fits else 'no'}{mark}")
    if chosen is None:
        least = shown[0] if shown else None
        print(f"cke-dist plan: no layout of {args.ranks} rank(s) fits {rank_memory / MiB:.0f} MiB per rank"
              + (f"; the smallest needs {least.total / MiB:.0f} MiB ({least.layout})" if least else
                 "; no layout divides this model and batch") + ": add ranks or hosts, or shrink data.batch_size",
              file=sys.stderr)
        return 1
    L = chosen.layout
    print(f"pick: {L}: --set parallel.tp={L.tp} --set parallel.pp={L.pp} --set parallel.zero={L.zero} "
          f"--set train.recompute={L.recompute} (dp = ranks / (tp x pp) = {L.dp})")
    return 0
