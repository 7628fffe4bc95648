"""Training-step bench: tokens/s of forward + backward + AdamW, ours against transformers'
LlamaForCausalLM in torch eager mode, same weights, same thread count, in one run. torch runs in a
process of its own with its own defaults (none of our pool settings), stepping when this one tells it.

    python bench/train_step.py --threads 1
    python bench/train_step.py --threads 2
    python bench/train_step.py --threads 1,2     # each count in its own process, then our scaling

Also prints the model FLOP/s (6 * params * tokens / time) of each against a numpy
float32 matmul peak measured in the same run (the best of the GEMM shapes this
model runs). Steps alternate ours / torch so that both see the same machine
noise (the idle one waits on a pipe); we report medians over --repeats. The
ratio is ours / torch in tokens/s. The matmul peak is the best GEMM time seen
between the steps.
"""
import argparse
import subprocess
import sys
import time

from common import (SHAPE_KEYS, TRAIN_TINY, add_shape_args, describe, gemm_shapes, llama_config, matmul_peak,
                    our_train_step, peer_env, random_batch, torch_train_step, training_threads)


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default=None, help="a count, or several (1,2): one process each, then a summary "
                                                   "(default 1; --smoke: 1,2)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    add_shape_args(p)   # the ~32M config by default
    p.add_argument("--no-torch", action="store_true", help="time ours only")
    p.add_argument("--smoke", action="store_true", help="a tiny model, one step each: checks that it runs")
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)   # the torch process (PeerStep)
    a = p.parse_args()
    if a.threads is None:
        a.threads = "1,2" if a.smoke else "1"
    if a.smoke:
        a.repeats, a.warmup = 1, 1
        vars(a).update({k: TRAIN_TINY[k] for k in SHAPE_KEYS})
    return a


args = parse()


def sweep(counts):
    """Each thread count in its own process (pools are sized at start), then ours/torch and our
    tokens/s against our first count's."""
    import re
    import subprocess
    rows = []
    for t in counts:
        argv, skip = [], False       # ours, minus every --threads, plus this one count (never a sweep)
        for a in sys.argv[1:]:
            if skip or a.startswith("--threads="):
                skip = False
                continue
            skip = a == "--threads"
            if not skip:
                argv.append(a)
        out = subprocess.run([sys.executable, __file__, *argv, "--threads", str(t)], capture_output=True,
                             text=True, timeout=3600)
        print(out.stdout, end="", flush=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        tps = {name: float(v) for name, v in re.findall(r"^(cke-dist|torch eager)\S*(?: \S+)*?\s+[\d.]+\s+(\d+)",
                                                         out.stdout, re.M)}
        rows.append((t, tps.get("cke-dist"), tps.get("torch eager")))
    print("\n| threads | ours tok/s | torch tok/s | ours/torch | ours vs our first count |")
    print("|---|---|---|---|---|")
    for t, ours, torch in rows:
        peer = f"{torch:.0f} | {ours / torch:.2f}" if torch else "- | -"
        print(f"| {t} | {ours:.0f} | {peer} | {ours / rows[0][1]:.2f}x |")
    return 0


if "," in args.threads:
    sys.exit(sweep([int(t) for t in args.threads.split(",")]))
args.threads = int(args.threads)
# thread counts must be fixed before numpy / numba / torch start their pools; ours with the pool wait
# policies `cke-dist train` sets, the torch peer (started with peer_env) with its own
if not args.peer:
    training_threads(args.threads)

import numpy as np  # noqa: E402

from cke_dist.model import Model  # noqa: E402
from cke_kernels.threads import set_num_threads  # noqa: E402


def peer():
    """The torch process: the same weights (seed 0) and batch; one step per "step" line on stdin, its
    loss and seconds on stdout."""
    s = vars(args)
    x, y = random_batch(s, 0)
    step = torch_train_step(Model.from_config(llama_config(s), seed=0), x, y, lr=1e-4, threads=args.threads)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        loss = step()
        print(f"{loss} {time.perf_counter() - t0}", flush=True)
    return 0


class PeerStep:
    """torch's step in its own process (peer_env: its own pool defaults); calling it runs one step
    there and returns the loss; .seconds holds the step's time measured in that process."""

    def __init__(self):
        shape = [x for k in SHAPE_KEYS for x in ("--" + k.replace("_", "-"), str(getattr(args, k)))]
        self.proc = subprocess.Popen([sys.executable, __file__, *shape, "--threads", str(args.threads), "--peer"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=peer_env(args.threads))
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the torch peer failed to start (exit {self.proc.wait()})")
        self.seconds = None

    def __call__(self):
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().split()
        if len(line) != 2:
            raise SystemExit(f"the torch peer failed (exit {self.proc.wait()})")
        self.seconds = float(line[1])
        return float(line[0])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main():
    set_num_threads(args.threads)
    s = vars(args)
    cfg = llama_config(s)
    model = Model.from_config(cfg, seed=0)
    tokens = args.batch * args.seq
    x, y = random_batch(s, 0)
    flops_per_step = 6.0 * model.num_params * tokens

    ours_step = our_train_step(model, x, y, lr=1e-4)
    torch_step = None if args.no_torch else PeerStep()

    print(f"train step bench: {describe(s, model.num_params)}, threads {args.threads}, {args.repeats} repeats "
          f"(median)", flush=True)
    first = {}
    for _ in range(args.warmup):
        first["ours"] = ours_step()
        if torch_step:
            first["torch"] = torch_step()
    if torch_step and args.warmup:
        print(f"first-step loss: ours {first['ours']:.6f}, torch {first['torch']:.6f} "
              f"(same weights and batch)", flush=True)
    times = {"ours": [], "torch": []}
    peak = 0.0
    for _ in range(args.repeats):
        peak = max(peak, matmul_peak(gemm_shapes(s)))  # sampled between steps: the same noise as the steps
        t0 = time.perf_counter()
        ours_step()
        times["ours"].append(time.perf_counter() - t0)
        if torch_step:
            torch_step()
            times["torch"].append(torch_step.seconds)
    if torch_step:
        torch_step.close()

    rows = [("cke-dist (numpy+numba)", times["ours"])]
    if torch_step:
        rows.append(("torch eager (transformers)", times["torch"]))
    print(f"{'implementation':<28} {'s/step':>8} {'tokens/s':>10} {'model GFLOP/s':>14} {'% matmul peak':>14}")
    med = {}
    for name, ts in rows:
        m = float(np.median(ts))
        med[name] = m
        print(f"{name:<28} {m:8.3f} {tokens / m:10.0f} {flops_per_step / m / 1e9:14.1f} "
              f"{100 * flops_per_step / m / peak:13.1f}%")
    print(f"numpy float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    if torch_step:
        ratio = med["torch eager (transformers)"] / med["cke-dist (numpy+numba)"]
        print(f"ratio ours/torch tokens/s at {args.threads} thread(s): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(peer() if args.peer else main())
