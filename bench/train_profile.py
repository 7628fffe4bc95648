"""Where a training step's time goes: per-op wall-clock timers around every kernel the model and
the optimizer call (GEMMs keyed by shape), at one thread count, medians over steps.

    python bench/train_profile.py --threads 2 --layers 2

Same model and batch as bench/train_step.py (same flags). Prints, per op: ms per step, share of
the step, and GFLOP/s for the GEMMs; "untimed" is the step minus the timed ops (Python between
the kernels). Timers add a perf_counter pair per call (~1 us), negligible against ms kernels.
"""
import argparse
import os
import sys
import time
from collections import defaultdict

from common import add_shape_args, llama_config, random_batch, training_threads


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    add_shape_args(p)   # the ~32M config by default
    p.add_argument("--top", type=int, default=30)
    return p.parse_args()


args = parse()
training_threads(args.threads)   # before numpy loads

import numpy as np  # noqa: E402

import cke_dist.model.llama as llama  # noqa: E402
import cke_kernels.attention as attention  # noqa: E402
import cke_kernels.linear as linear  # noqa: E402
from cke_dist.model import Model  # noqa: E402
from cke_dist.train.optim import AdamW  # noqa: E402
from cke_kernels.threads import set_num_threads  # noqa: E402

acc = defaultdict(float)     # name -> seconds in the current step
flops = defaultdict(float)   # name -> flops per step (GEMMs)
_depth = [0]                 # only the outermost timer counts (no double counting of nested ops)


def timed(name_of, fn, flop_of=None):
    def wrapper(*a, **k):
        if _depth[0]:
            return fn(*a, **k)
        _depth[0] += 1
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            dt = time.perf_counter() - t0
            _depth[0] -= 1
            name = name_of(*a, **k)
            acc[name] += dt
            if flop_of is not None:
                flops[name] += flop_of(*a, **k)
    return wrapper


def _shape(x):
    return "x".join(str(s) for s in x.shape)




def install():
    for name in ("rmsnorm_forward", "rmsnorm_backward", "qkv_rope_forward", "qkv_rope_backward",
                 "swiglu_forward", "swiglu_backward", "residual_forward", "embedding_forward",
                 "embedding_backward", "ce_max_and_target", "ce_exp_sum", "ce_losses", "ce_grad",
                 "check_targets", "count_valid"):
        setattr(llama, name, timed(lambda *a, _n=name, **k: _n, getattr(llama, name)))

    def lf_name(x, w, b, out):
        return f"linear fwd x{_shape(x)} w{_shape(w)}"
    llama.linear_forward = timed(lf_name, linear.linear_forward,
                                 lambda x, w, b, out: 2.0 * x.shape[0] * w.shape[0] * w.shape[1])

    # linear_backward's two GEMMs timed apart: wrap numpy inside cke_kernels.linear
    lin_np = _TimedNumpyLinear()
    linear.np = lin_np
    llama.linear_backward = linear.linear_backward
    # attention as two ops: it splits its batch over threads, and these timers are not thread-safe
    llama.attention_forward = timed(lambda *a, **k: "attention fwd (GEMMs + softmax)", attention.attention_forward)
    llama.attention_backward = timed(lambda *a, **k: "attention bwd (GEMMs + softmax)", attention.attention_backward)


class _TimedNumpyLinear:
    def __init__(self):
        def name(a, b, out=None):
            kind = "dW" if a.ndim == 2 and a.strides[0] < a.strides[1] else "dX"
            return f"linear bwd {kind} {_shape(a)}@{_shape(b)}"
        self.matmul = timed(name, np.matmul, lambda a, b, out=None: 2.0 * np.prod(out.shape) * a.shape[-1])
        self.sum = timed(lambda *a, **k: "linear bias sum", np.sum)

    def __getattr__(self, k):
        return getattr(np, k)


def busy_jiffies():
    """(all CPUs' busy time, this process's CPU time), in clock ticks."""
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    with open("/proc/self/stat") as f:
        mine = f.read().rsplit(")", 1)[1].split()
    return sum(cpu) - cpu[3] - cpu[4], int(mine[11]) + int(mine[12])


def main():
    set_num_threads(args.threads)
    model = Model.from_config(llama_config(vars(args)), seed=0)
    B, T = args.batch, args.seq
    x, y = random_batch(vars(args), 0)
    opt = AdamW(model, lr=1e-4, weight_decay=0.1)
    model.zero_grad()
    model.forward_backward(x, y)   # compiles (or loads) every kernel before install() swaps numpy
    opt.step()                     # in the kernels' modules for a timed one (numba could not type it)
    install()
    model.zero_grad = timed(lambda: "zero_grad", model.zero_grad)
    opt.step = timed(lambda: "adamw", opt.step)

    steps, per = [], defaultdict(list)
    b0, m0, w0 = *busy_jiffies(), time.perf_counter()
    for i in range(args.repeats + 1):
        acc.clear()
        flops.clear()
        t0 = time.perf_counter()
        model.zero_grad()
        model.forward_backward(x, y)
        opt.step()
        dt = time.perf_counter() - t0
        if i == 0:
            continue   # warm-up: numba caches, allocation
        steps.append(dt)
        for k, v in acc.items():
            per[k].append(v)
        per["untimed (Python between ops)"].append(dt - sum(acc.values()))
    b1, m1 = busy_jiffies()
    hz, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count()
    others = (b1 - b0 - (m1 - m0)) / hz / (ncpu * (time.perf_counter() - w0))
    step = float(np.median(steps))
    print(f"other processes used {100 * others:.0f}% of the {ncpu} CPUs during the run")
    print(f"threads {args.threads}, {args.layers} layers, batch {B} x {T}: step {1e3 * step:.1f} ms "
          f"({B * T / step:.0f} tokens/s), medians of {args.repeats}")
    rows = sorted(((float(np.median(v)), k) for k, v in per.items()), reverse=True)
    print(f"{'op':<64} {'ms':>8} {'share':>6} {'GFLOP/s':>8}")
    for ms, k in rows[:args.top]:
        gf = f"{flops[k] / ms / 1e9:8.1f}" if flops.get(k) else ""
        print(f"{k:<64} {1e3 * ms:8.1f} {100 * ms / step:5.1f}% {gf:>8}")
    gemm = sum(float(np.median(per[k])) for k in per if k in flops)
    print(f"GEMMs total {1e3 * gemm:.1f} ms ({100 * gemm / step:.1f}%), "
          f"{sum(flops.values()) / gemm / 1e9:.1f} GFLOP/s; the rest {1e3 * (step - gemm):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
