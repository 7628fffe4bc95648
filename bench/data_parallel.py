"""Data-parallel training bench: tokens/s of our train_step at dp=1 and dp=2, and of transformers'
LlamaForCausalLM under torch DistributedDataParallel (gloo) at dp=1 and dp=2, in one run.

    python bench/data_parallel.py             # the ~32M config: hidden 512, 8 layers, 8/4 heads,
                                              # inter 1408, vocab 8192, batch 8 x seq 256 per rank
    python bench/data_parallel.py --small     # a tiny model, a few steps: checks that it runs

One thread per rank (BLAS, OpenMP, numba, torch). Each rank keeps its own batch of --batch rows
(weak scaling: dp=2 trains twice the tokens per step), so perfect scaling is dp2/dp1 = 2.0.
A step is the whole optimizer step: forward+backward, gradient averaging (ours: buckets overlapped
with backward; torch: DDP's bucketed hooks, 25 MB both), clip to norm 1.0, AdamW. Each
configuration is its own mpiexec launch; the table shows medians over --steps timed steps, and
the ratios: ours dp2/dp1, ours/torch at dp=2 (targets >= 1.8x and >= 1.2x).
"""
import argparse
import json
import os
import sys
import time

from common import describe, launch_worker, llama_config, median, random_batch, report, setup_gloo, train_shape


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", "--smoke", action="store_true", help="a tiny model and 3 steps: a quick check that it runs")
    p.add_argument("--steps", type=int, help="timed steps per configuration (median reported)")
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--no-torch", action="store_true", help="time ours only")
    p.add_argument("--no-overlap", action="store_true",
                   help="ours: launch every bucket after backward (the baseline the overlap is measured against)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration before it is killed")
    p.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)  # one rank of one config
    p.add_argument("--shape", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def batches(s, rank, n):
    """`n` (inputs, targets) batches of this rank's rows, different per rank and step."""
    return [random_batch(s, [rank, i]) for i in range(n)]


def worker_ours(s, bucket_mb, overlap=True):
    from cke_dist.comm import init
    from cke_dist.model import Model
    from cke_dist.parallel import GradBuckets, ProcessGrid, sync_params, train_step
    from cke_dist.train.optim import AdamW

    grid = ProcessGrid(init())
    model = Model.from_config(llama_config(s), seed=0)
    sync_params(model, grid)
    opt = AdamW(model, lr=1e-4, weight_decay=0.1)
    buckets = GradBuckets(model.grads, grid.dp_group, bucket_mb=bucket_mb, overlap=overlap)
    data = batches(s, grid.dp_rank, s["warmup"] + s["steps"])
    times, waits = [], []
    for i, mb in enumerate(data):
        grid.world.barrier()  # every rank starts the step together: a step's time is the slowest rank's
        t0 = time.perf_counter()
        train_step(model, opt, grid, [mb], 1e-4, 1.0, buckets)
        if i >= s["warmup"]:
            times.append(time.perf_counter() - t0)
            waits.append(buckets.wait_s)
    return grid.world.rank, grid.dp, times, {"buckets": len(buckets.buckets), "waits": waits}


def worker_torch(s, bucket_mb):
    from mpi4py import MPI
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import AutoConfig, AutoModelForCausalLM

    comm = MPI.COMM_WORLD
    torch, dist = setup_gloo(comm)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**llama_config(s).to_dict()), dtype=torch.float32)
    hf.train()
    ddp = DDP(hf, bucket_cap_mb=bucket_mb)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches(s, comm.rank, s["warmup"] + s["steps"])]
    times = []
    for i, (x, y) in enumerate(data):
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = ddp(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, s["vocab"]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        opt.step()
        dist.all_reduce(loss.detach(), op=dist.ReduceOp.AVG)  # the logged loss, as ours does
        if i >= s["warmup"]:
            times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    return comm.rank, comm.size, times, {}


def run_worker(args):
    s = json.loads(args.shape)
    if args.worker == "ours":
        rank, dp, times, extra = worker_ours(s, args.bucket_mb, overlap=not args.no_overlap)
    else:
        rank, dp, times, extra = worker_torch(s, args.bucket_mb)
    if rank == 0:
        report({"dp": dp, "times": times, **extra})
    if args.worker == "torch":
        # gloo's threads can abort the process in C++ teardown ("terminate called without an active
        # exception") after the work is done: leave without running the destructors
        from mpi4py import MPI
        MPI.COMM_WORLD.Barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def launch(args, s, impl, dp):
    """One configuration as its own job (one thread per rank)."""
    extra = ["--no-overlap"] if args.no_overlap else []
    r = launch_worker(__file__, ["--worker", impl, "--shape", json.dumps(s), "--bucket-mb", str(args.bucket_mb),
                                 *extra], dp, 1, args.timeout, f"{impl} dp={dp}")
    return r


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return run_worker(args)
    s = train_shape(args.small, args.steps)
    configs = [("ours", 1), ("ours", 2)] + ([] if args.no_torch else [("torch", 1), ("torch", 2)])
    print(f"data-parallel bench: {describe(s)} per rank, 1 thread per rank, buckets {args.bucket_mb} MB, median of "
          f"{s['steps']} steps after {s['warmup']} warmup", flush=True)
    tok_s = {}
    print(f"{'implementation':<34} {'dp':>3} {'s/step':>8} {'tokens/s':>10} {'comm wait s':>12}", flush=True)
    for impl, dp in configs:
        r = launch(args, s, impl, dp)
        med = median(r["times"])
        tok_s[impl, dp] = dp * s["batch"] * s["seq"] / med
        if impl == "ours":
            name = f"cke-dist train_step ({r['buckets']} buckets{'' if not args.no_overlap else ', no overlap'})"
            wait = f"{median(r['waits']):12.3f}"  # what backward did not hide (rank 0, median)
        else:
            name, wait = "torch DDP gloo (transformers)", f"{'-':>12}"
        print(f"{name:<34} {dp:>3} {med:8.3f} {tok_s[impl, dp]:10.0f} {wait}", flush=True)
    print(f"ours dp2/dp1: {tok_s['ours', 2] / tok_s['ours', 1]:.2f}x (target >= 1.8x)")
    if not args.no_torch:
        print(f"torch dp2/dp1: {tok_s['torch', 2] / tok_s['torch', 1]:.2f}x")
        print(f"ours/torch at dp=1: {tok_s['ours', 1] / tok_s['torch', 1]:.2f}x")
        print(f"ours/torch at dp=2: {tok_s['ours', 2] / tok_s['torch', 2]:.2f}x (target >= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
