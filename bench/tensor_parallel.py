"""Tensor-parallel training bench: one optimizer step of the ~32M config at tp=2 (one thread per
rank) against one rank at 1 thread, one rank at 2 threads, and transformers' LlamaForCausalLM in
torch eager at 2 threads, in one run.

    python bench/tensor_parallel.py            # hidden 512, 8 layers, 8/4 heads, inter 1408,
                                               # vocab 8192, batch 8 x seq 256 (bench/train_step.py's)
    python bench/tensor_parallel.py --small    # a tiny model, a few steps: checks that it runs

A step is the whole optimizer step (train_step: forward+backward, clip to 1.0, AdamW); the same
batch for every configuration (tp splits the model, not the data). Each configuration is its own
process or mpiexec launch, so the machine's two cores are not shared between them. The table shows
medians over --steps timed steps; for tp=2 also the time rank 0 spends inside tp allreduces and the
bytes they moved, against the formula (per step: 4 per layer + 2 of tokens x hidden, 3 of tokens
in the cross-entropy, 1 for the grad norm). Targets: tp=2 >= 1.7x one rank at 1 thread, and
>= 1.2x torch at 2 threads (tokens/s).
"""
import argparse
import json
import sys
import time

from common import describe, launch_worker, llama_config, machine_line, median, random_batch, report, train_shape


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", "--smoke", action="store_true", help="a tiny model and 3 steps: a quick check that it runs")
    p.add_argument("--steps", type=int, help="timed steps per configuration (median reported)")
    p.add_argument("--no-torch", action="store_true", help="time ours only")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration before it is killed")
    p.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def batches(s, n):
    return [random_batch(s, i) for i in range(n)]


def worker_ours(s, threads):
    from cke_kernels.threads import set_num_threads

    from cke_dist.comm import init
    from cke_dist.model import Model
    from cke_dist.parallel import GradBuckets, ParallelGrads, ProcessGrid, train_step
    from cke_dist.train.optim import AdamW

    set_num_threads(threads)
    world = init()
    grid = ProcessGrid(world, tp=world.size)
    model = Model.from_config(llama_config(s), seed=0, tp_group=grid.tp_group)
    opt = AdamW(model, lr=1e-4, weight_decay=0.1)
    buckets, tp_grads = GradBuckets(model.grads, grid.dp_group), ParallelGrads(model, grid)
    tp = grid.tp_group
    comm_s = [0.0]
    if tp.size > 1:   # time what the step spends inside tp allreduces (all of them are synchronous)
        plain = tp.allreduce

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return plain(*a, **k)
            finally:
                comm_s[0] += time.perf_counter() - t0
        tp.allreduce = timed
    times, comms, stats = [], [], None
    for i, mb in enumerate(batches(s, s["warmup"] + s["steps"])):
        world.barrier()
        tp.reset_stats()
        comm_s[0] = 0.0
        t0 = time.perf_counter()
        loss, _ = train_step(model, opt, grid, [mb], 1e-4, 1.0, buckets, tp_grads)
        if i >= s["warmup"]:
            times.append(time.perf_counter() - t0)
            comms.append(comm_s[0])
            stats = dict(tp.stats)
    return world.rank, {"times": times, "comm": comms, "stats": stats, "loss": loss}


def worker_torch(s, threads):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**llama_config(s).to_dict()), dtype=torch.float32)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for i, (x, y) in enumerate(batches(s, s["warmup"] + s["steps"])):
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(hf(x).logits.reshape(-1, s["vocab"]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        loss.item()
        if i >= s["warmup"]:
            times.append(time.perf_counter() - t0)
    return 0, {"times": times}


def launch(args, s, impl, ranks, threads):
    return launch_worker(__file__, ["--worker", impl, "--shape", json.dumps(s), "--threads", str(threads)], ranks,
                         threads, args.timeout, f"{impl} x{ranks}")


def main(argv=None):
    args = parse(argv)
    if args.worker:
        s = json.loads(args.shape)
        rank, r = (worker_ours if args.worker == "ours" else worker_torch)(s, args.threads)
        if rank == 0:
            report(r)
        return 0
    s = train_shape(args.small, args.steps)
    tokens = s["batch"] * s["seq"]
    print(f"tensor-parallel bench: {describe(s)}, median of {s['steps']} steps after {s['warmup']} warmup",
          flush=True)
    configs = [("cke-dist, 1 rank, 1 thread", "ours", 1, 1), ("cke-dist, 1 rank, 2 threads", "ours", 1, 2),
               ("cke-dist tp=2, 1 thread/rank", "ours", 2, 1)]
    if not args.no_torch:
        configs.append(("torch eager, 2 threads", "torch", 1, 2))
    print(machine_line(s), flush=True)   # one rank's share of the machine
    print(f"{'configuration':<32} {'s/step':>8} {'tokens/s':>10} {'tp comm s':>10}", flush=True)
    tok_s, tp = {}, None
    for name, impl, ranks, threads in configs:
        r = launch(args, s, impl, ranks, threads)
        med = median(r["times"])
        tok_s[name] = tokens / med
        comm = f"{median(r['comm']):10.3f}" if ranks > 1 else f"{'-':>10}"
        print(f"{name:<32} {med:8.3f} {tok_s[name]:10.0f} {comm}", flush=True)
        if ranks > 1:
            tp = r
    L, C, N = s["layers"], s["hidden"], tokens
    want_n = 4 * L + 2 + 3 + 1
    want_bytes = (4 * L + 2) * N * C * 4 + 3 * N * 4 + 8
    got_n, got_bytes = tp["stats"]["allreduce"]
    print(f"tp=2 allreduces per step: {got_n} moving {got_bytes / 2**20:.2f} MiB (formula: {want_n}, "
          f"{want_bytes / 2**20:.2f} MiB){'' if (got_n, got_bytes) == (want_n, want_bytes) else '  MISMATCH'}")
    print(f"tp=2 time in allreduces: {median(tp['comm']):.3f} s of {median(tp['times']):.3f} s per step")
    one = tok_s["cke-dist, 1 rank, 1 thread"]
    two = tok_s["cke-dist tp=2, 1 thread/rank"]
    print(f"tp=2 / one rank at 1 thread: {two / one:.2f}x (target >= 1.7x)")
    print(f"tp=2 / one rank at 2 threads: {two / tok_s['cke-dist, 1 rank, 2 threads']:.2f}x")
    if not args.no_torch:
        print(f"tp=2 / torch eager at 2 threads: {two / tok_s['torch eager, 2 threads']:.2f}x (target >= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
