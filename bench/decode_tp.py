"""Sharded decode bench: latency per token and memory per rank of greedy generation (batch 1) on the
Llama-3.2-1B shape (random weights), tp=2 with one thread per rank against one rank at 1 thread and
one rank at 2 threads, all through the serving engine (what `cke-dist generate --tp` runs), in one run.

    python bench/decode_tp.py            # Llama-3.2-1B shape: writes a 4.9 GB float32 directory once
    python bench/decode_tp.py --smoke    # a small model: checks that it runs

Each configuration is its own process or mpiexec launch that loads the directory the way the CLI
does (each rank reads only its slices), prefills --prompt-len tokens and times --new-tokens decode
steps (median). Memory per rank is the peak resident set (VmHWM) of the largest rank. Targets
(issue 12): tp=2 latency <= 0.6x tp=1 at 1 thread; memory per rank <= 0.55x the one-rank figure.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import LLAMA_1B, launch_worker, machine_line, report

SMALL = dict(LLAMA_1B, vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a small model and a few tokens: checks that it runs")
    p.add_argument("--dir", help="model directory to use or create (default: a temporary one)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss() -> int:
    """Bytes: this process's peak resident set (VmHWM; ru_maxrss would include the launching
    process's peak, which Linux carries across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args):
    import numpy as np

    from cke_dist.comm import init
    from cke_dist.serving import Engine, Params

    world = init(quiet=True)
    t0 = time.perf_counter()
    engine = Engine.build(args.dir, world, tp=args.tp, max_batch=1, max_len=args.prompt_len + args.new_tokens + 1)
    load_s = time.perf_counter() - t0
    stamps = []
    if world.rank == 0:      # the client in a thread, the engine loop on the main thread (as the CLI runs it)
        import threading

        def client():
            prompt = np.random.default_rng(0).integers(0, engine.vocab, args.prompt_len).tolist()
            for _ in engine.submit(prompt, Params(max_tokens=args.new_tokens, temperature=0)).stream():
                stamps.append(time.perf_counter())
            engine.shutdown()
        threading.Thread(target=client).start()
        engine.run_main()
    else:
        engine.run()
    rss = np.array([peak_rss()], np.int64)
    every = np.zeros(world.size, np.int64)
    world.allgather(rss, every) if world.size > 1 else every.__setitem__(0, rss[0])
    if world.rank == 0:
        steps = np.diff(stamps)[1:]          # decode steps only (the first token is the prefill's)
        report({"step_s": float(np.median(steps)), "rss": every.tolist(), "load_s": load_s})


def make_dir(shape, d: Path) -> None:
    from cke_dist.model import LlamaConfig, Model
    if (d / "config.json").is_file():
        return
    print(f"writing a random {shape['hidden_size']}-hidden model to {d} ...", flush=True)
    Model.from_config(LlamaConfig.from_dict(shape), seed=0, init_std=0.02).save(d)


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.prompt_len, args.new_tokens = 8, 6
    shape = SMALL if args.smoke else LLAMA_1B
    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cke-decode-tp-")
        args.dir = tmp.name
    make_dir(shape, Path(args.dir))
    from cke_dist.model import LlamaConfig
    cfg = LlamaConfig.from_dict(shape)
    print(f"sharded decode bench: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, "
          f"float32, batch 1, prompt {args.prompt_len}, median of {args.new_tokens - 2} decode steps", flush=True)
    print(machine_line(dict(batch=64, seq=1, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                            vocab=cfg.vocab_size)), flush=True)
    configs = [("1 rank, 1 thread", 1, 1), ("1 rank, 2 threads", 1, 2), ("tp=2, 1 thread/rank", 2, 1)]
    print(f"{'configuration':<24} {'ms/token':>9} {'tokens/s':>9} {'GiB/rank':>9}", flush=True)
    res = {}
    for name, tp, threads in configs:
        r = launch_worker(__file__, ["--worker", "--dir", args.dir, "--tp", str(tp), "--prompt-len",
                                     str(args.prompt_len), "--new-tokens", str(args.new_tokens)],
                          tp, threads, args.timeout, name)
        res[name] = r
        print(f"{name:<24} {1e3 * r['step_s']:9.1f} {1 / r['step_s']:9.1f} {max(r['rss']) / 2**30:9.2f}", flush=True)
    one, two_t, tp2 = (res[n] for n, _, _ in configs)
    print(f"tp=2 latency / 1 rank at 1 thread: {tp2['step_s'] / one['step_s']:.2f}x (target <= 0.6x)")
    print(f"tp=2 latency / 1 rank at 2 threads: {tp2['step_s'] / two_t['step_s']:.2f}x")
    print(f"tp=2 memory per rank / 1 rank: {max(tp2['rss']) / max(one['rss']):.2f}x (target <= 0.55x)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
