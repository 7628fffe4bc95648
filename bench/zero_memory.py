"""ZeRO-1 memory bench: optimizer-state bytes and peak RSS per rank of the ~32M config at dp = the
rank count, zero=0 against zero=1 (each its own launch).

    python bench/zero_memory.py            # launches mpiexec -n 2 for each setting
    python bench/zero_memory.py --smoke    # the tiny shape: checks that it runs

Measured after the model and the optimizer are built and one training step ran (activations
included), on rank 0.
"""
import argparse
import json
import resource
import sys

from common import launch_worker, llama_config, random_batch, report, train_shape


def worker(s, zero):
    from cke_dist.comm import init
    from cke_dist.model import Model
    from cke_dist.parallel import GradBuckets, ProcessGrid, Zero1, train_step
    from cke_dist.train.optim import AdamW

    grid = ProcessGrid(init(quiet=True))
    model = Model.from_config(llama_config(s), seed=0)
    z = Zero1(model, grid.dp_group) if zero else None
    opt = AdamW(z.shard if z else model, lr=1e-4)
    buckets = GradBuckets(model.grads, None if z else grid.dp_group)
    train_step(model, opt, grid, [random_batch(s, [grid.dp_rank, 0])], 1e-4, 1.0, buckets, zero=z)
    state = sum(v.nbytes for v in opt.state_dict().values() if hasattr(v, "nbytes"))
    return grid.world.rank, {"dp": grid.dp, "params": model.params.nbytes, "state": state,
                             "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", "--smoke", action="store_true", help="the tiny shape: checks that it runs")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        rank, r = worker(json.loads(args.shape), args.worker)
        if rank == 0:
            report(r)
        return 0
    s = train_shape(args.small)
    print(f"ZeRO-1 memory bench: hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, AdamW, "
          f"batch {s['batch']} x {s['seq']} per rank, 2 ranks (dp=2), rank 0 after one step")
    print(f"{'setting':<10} {'params MiB':>11} {'optimizer state MiB':>20} {'peak RSS MiB':>13}")
    got = {}
    for zero in (0, 1):
        r = launch_worker(__file__, ["--worker", str(zero), "--shape", json.dumps(s)], 2, 1, 900, f"zero={zero}")
        got[zero] = r
        print(f"{'zero=' + str(zero):<10} {r['params'] / 2**20:11.1f} {r['state'] / 2**20:20.1f} "
              f"{r['rss'] / 2**20:13.0f}")
    print(f"zero=1 / zero=0: optimizer state {got[1]['state'] / got[0]['state']:.2f}x, "
          f"peak RSS {got[1]['rss'] / got[0]['rss']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
