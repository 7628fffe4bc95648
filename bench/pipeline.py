"""Pipeline-parallel training bench: one optimizer step of the ~32M config (bench/train_step.py's) with
data.grad_accum = 8 micro-batches, pp=2 with one thread per rank under each schedule (gpipe, 1f1b,
zb) against one rank at 1 thread, in one run; with each stage's idle (bubble) fraction beside the
theory (p - 1) / (m + p - 1).

    python bench/pipeline.py            # hidden 512, 8 layers, 8/4 heads, inter 1408, vocab 8192,
                                        # batch 8 x seq 256 per step, 8 micro-batches of 1 row
    python bench/pipeline.py --small    # a tiny model, a few steps: checks that it runs

A step is the whole optimizer step (train_step: the schedule's forward and backward passes, clip to
1.0, AdamW); the same batch for every configuration. A stage's bubble is the time it spends
blocked in receives (waiting for its neighbour) over the step time. Each configuration is its own
launch; medians over --steps timed steps. Targets: 1f1b pp=2 >= 1.6x one rank; its bubble within
5 points of the theory; zb's bubble below 1f1b's.
"""
import argparse
import json
import sys
import time

from common import describe, launch_worker, llama_config, machine_line, median, random_batch, report, train_shape

ACCUM = 8


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", "--smoke", action="store_true", help="a tiny model and 3 steps: a quick check that it runs")
    p.add_argument("--steps", type=int, help="timed steps per configuration (median reported)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration before it is killed")
    p.add_argument("--worker", help=argparse.SUPPRESS)        # the schedule of one configuration
    p.add_argument("--shape", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def micro_batches(s, step):
    x, y = random_batch(s, step)
    rows = s["batch"] // ACCUM
    return [(x[k * rows:(k + 1) * rows], y[k * rows:(k + 1) * rows]) for k in range(ACCUM)]


def worker(s, kind):
    import numpy as np

    from cke_dist.comm import init
    from cke_dist.model import Model
    from cke_dist.parallel import GradBuckets, ParallelGrads, ProcessGrid, grid_stage, train_step
    from cke_dist.train.optim import AdamW

    world = init()
    grid = ProcessGrid(world, pp=world.size)
    cfg = llama_config(s)
    model = Model.from_config(cfg, seed=0, stage=grid_stage(grid, cfg))
    opt = AdamW(model, lr=1e-4, weight_decay=0.1)
    buckets, grads = GradBuckets(model.grads, grid.dp_group), ParallelGrads(model, grid)
    times, idle = [], []
    for i in range(s["warmup"] + s["steps"]):
        world.barrier()
        stats = {}
        t0 = time.perf_counter()
        train_step(model, opt, grid, micro_batches(s, i), 1e-4, 1.0, buckets, grads, schedule=kind, stats=stats)
        dt = time.perf_counter() - t0
        if i >= s["warmup"]:
            times.append(dt)
            idle.append(stats.get("wait_s", 0.0) / dt)
    mine = np.array([median(times), median(idle)], np.float64)
    every = np.zeros(2 * world.size, np.float64)
    world.allgather(mine, every)
    every = every.reshape(world.size, 2)
    return world.rank, {"step_s": float(every[:, 0].max()), "idle": every[:, 1].tolist()}


def launch(args, s, kind, ranks):
    return launch_worker(__file__, ["--worker", kind, "--shape", json.dumps(s)], ranks, 1, args.timeout,
                         f"{kind} x{ranks}")


def main(argv=None):
    args = parse(argv)
    if args.worker:
        s = json.loads(args.shape)
        rank, r = worker(s, args.worker)
        if rank == 0:
            report(r)
        return 0
    s = train_shape(args.small, args.steps)
    s["batch"] = max(s["batch"], ACCUM)
    p, m = 2, ACCUM
    theory = (p - 1) / (m + p - 1)
    print(f"pipeline bench: {describe(s)} as {m} micro-batches, 1 thread per rank, median of {s['steps']} steps "
          f"after {s['warmup']} warmup", flush=True)
    print(machine_line(s), flush=True)   # one rank's share of the machine
    print(f"{'configuration':<26} {'s/step':>8} {'tokens/s':>10} {'x one rank':>11} {'bubble stage 0':>15} "
          f"{'stage 1':>8} {'theory':>7}", flush=True)
    base = launch(args, s, "1f1b", 1)["step_s"]
    tokens = s["batch"] * s["seq"]
    print(f"{'one rank, 1 thread':<26} {base:8.3f} {tokens / base:10.0f} {1.0:11.2f}", flush=True)
    out = {}
    for kind in ("gpipe", "1f1b", "zb"):
        r = launch(args, s, kind, p)
        out[kind] = r
        idle = "".join(f"{100 * x:7.1f}% " for x in r["idle"])
        print(f"{'pp=2 ' + kind:<26} {r['step_s']:8.3f} {tokens / r['step_s']:10.0f} {base / r['step_s']:11.2f} "
              f"{idle:>24} {100 * theory:6.1f}%", flush=True)
    f1 = out["1f1b"]
    print(f"1f1b pp=2 / one rank: {base / f1['step_s']:.2f}x (target >= 1.6x)")
    print(f"1f1b bubble (mean of stages) {100 * sum(f1['idle']) / p:.1f}% vs theory {100 * theory:.1f}% "
          f"(target: within 5 points)")
    print(f"zb bubble {100 * sum(out['zb']['idle']) / p:.1f}% vs 1f1b {100 * sum(f1['idle']) / p:.1f}% "
          f"(target: below)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
