"""`cke-dist` command line: one subcommand per job, each owned by its module.

Each job module exposes `add_arguments(parser)` and `run(args) -> int`. Only the
module of the subcommand being run is imported, so `cke-dist info` does not pay
for numba or torch.

Bad input (a ValueError or OSError out of a job: a missing file, a model that does not fit the
arguments) ends the command with one line, `cke-dist JOB: error: ...`, and exit status 2; under
mpiexec or srun only the first rank of each host prints it (the ranks of a host see the same files
and arguments). CKE_TRACEBACK=1 shows the traceback instead. Any other exception is a bug of ours
and keeps its traceback.
"""
import argparse
import importlib
import os
import sys

from cke_kernels import THREAD_VARS

# decode's thread count when --threads was not given, and why (the jobs print it)
DEFAULT_THREADS: tuple[int, str] | None = None

# subcommand -> (module, one-line help)
COMMANDS = {
    "train": ("cke_dist.cli.train", "train a model (one process, or under mpiexec)"),
    "prepare": ("cke_dist.cli.prepare", "tokenize a text corpus with a model's tokenizer ahead of training"),
    "generate": ("cke_dist.cli.generate", "generate text from a model directory"),
    "serve": ("cke_dist.cli.serve", "an OpenAI-compatible HTTP server (one process, or under mpiexec as tp x pp)"),
    "plan": ("cke_dist.cli.plan", "per-rank memory of each layout of a training job, and the one to run"),
    "compare": ("cke_dist.cli.compare", "check our numbers against the PyTorch reference"),
    "quantize": ("cke_dist.cli.quantize", "write a Q8_0 copy of a model directory"),
    "info": ("cke_dist.cli.info", "transports, RDMA devices, MPI library, threads"),
    "plot": ("cke_dist.cli.plot", "loss and tokens/s curves of training runs, as a PNG"),
    "export": ("cke_dist.cli.export", "a checkpoint as a plain Hugging Face directory (sharded weights + index)"),
    "launch": ("cke_dist.cli.launch", "a cluster config to the mpiexec (or sbatch) command line, or run it"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="cke-dist", description="Distributed CPU training and inference for Llama-family models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    if chosen == "launch":      # its own parser: everything after `--` is the job, passed through untouched
        from cke_dist.cli.launch import main as launch
        return launch(argv[1:])
    if chosen == "train":   # before numpy and numba start their thread pools (see cke_kernels)
        from cke_kernels import training_pool_env
        training_pool_env()
    threads = _option(argv, "--threads")
    if chosen in ("generate", "serve") and threads and threads.isdigit() and int(threads) > 0:
        from cke_kernels import decode_pool_env
        decode_pool_env(int(threads))
    elif chosen in ("generate", "serve") and threads is None and not any(v in os.environ for v in THREAD_VARS):
        from cke_kernels import decode_pool_env, default_decode_threads
        n, why = default_decode_threads()
        decode_pool_env(n)
        global DEFAULT_THREADS
        DEFAULT_THREADS = (n, f"{n} thread{'s' * (n > 1)} ({why}; --threads to choose)")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, OSError) as e:
        if os.environ.get("CKE_TRACEBACK"):
            raise
        if _reports_errors():
            print(f"cke-dist {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2


def int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (argparse prints the one-line usage error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: give {lo}..{hi}" if hi is not None
                                             else f"{v} is out of range: give an integer >= {lo}")
        return v
    return parse


def _reports_errors() -> bool:
    """Whether this process prints a command's error: outside a launcher always, under one the
    host's first rank (MPICH's Hydra, Open MPI and Slurm each name the rank within its host)."""
    for var in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"):
        local = os.environ.get(var)
        if local is not None and local.isdigit():
            return int(local) == 0
    return True


def _option(argv, name):
    """The value given to `name` (`name V` or `name=V`), read before argparse: pools start at import."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


if __name__ == "__main__":
    sys.exit(main())
