"""Activation recomputation bench: for train.recompute none and full, the bytes of activations
one training step keeps, the process's peak RSS, and the step time (median), each setting in its own
process, on the ~32M config (one process, --threads).

    python bench/recompute.py                # the ~32M config, batch 8 x seq 256, 1 thread
    python bench/recompute.py --seq 1024 --batch 2
    python bench/recompute.py --smoke        # the tiny shape: checks that it runs

Activation bytes: the buffers of the step's Activations (every layer's caches, or one layer's that the
recomputation reuses, plus the per-layer inputs it keeps); peak RSS adds the model, gradients and
AdamW's moments, the same for every setting.
"""
import argparse
import resource
import sys
import time

from common import (SHAPE_KEYS, TRAIN_TINY, add_shape_args, describe, launch_worker, llama_config, median,
                    our_train_step, random_batch, report)

MODES = ("none", "full")


def worker(s, mode, threads, repeats):
    from cke_dist.model import Model
    from cke_kernels.threads import set_num_threads
    set_num_threads(threads)
    model = Model.from_config(llama_config(s), seed=0)
    model.recompute = mode
    x, y = random_batch(s, 0)
    step = our_train_step(model, x, y, lr=1e-4)
    step()   # warm-up: compiles, allocates the activations
    acts = sum(v.nbytes for v in vars(model._acts_train).values() if hasattr(v, "nbytes"))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"acts": acts, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "s": median(times),
            "tokens": int(x.size)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per setting (median)")
    p.add_argument("--smoke", action="store_true", help="the tiny shape, one step: checks that it runs")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    add_shape_args(p)
    a = p.parse_args()
    if a.smoke:
        a.repeats = 1
        vars(a).update({k: TRAIN_TINY[k] for k in SHAPE_KEYS})
    s = {k: getattr(a, k) for k in SHAPE_KEYS}
    if a.worker:
        report(worker(s, a.worker, a.threads, a.repeats))
        return 0
    print(f"recompute bench: {describe(s)}, threads {a.threads}, {a.repeats} timed steps (median), "
          f"each setting its own process", flush=True)
    shape = [x for k in SHAPE_KEYS for x in ("--" + k.replace("_", "-"), str(s[k]))]
    got = {}
    print(f"{'recompute':<10} {'activations MiB':>16} {'peak RSS MiB':>13} {'s/step':>8} {'tokens/s':>9}")
    for mode in MODES:
        r = got[mode] = launch_worker(__file__, ["--worker", mode, "--threads", str(a.threads), "--repeats",
                                                 str(a.repeats), *shape], 1, a.threads, 3600, f"recompute={mode}")
        print(f"{mode:<10} {r['acts'] / 2**20:16.1f} {r['rss'] / 2**20:13.0f} {r['s']:8.3f} "
              f"{r['tokens'] / r['s']:9.0f}", flush=True)
    for mode in MODES[1:]:
        print(f"{mode} / none: activations {got[mode]['acts'] / got['none']['acts']:.2f}x, peak RSS "
              f"{got[mode]['rss'] / got['none']['rss']:.2f}x, step time {got[mode]['s'] / got['none']['s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
