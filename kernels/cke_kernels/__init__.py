"""Single-node fused kernels: pure functions on numpy arrays (no MPI, no models).

Rules every module keeps: float32 compute; GEMMs through numpy's BLAS with out=,
everything else in numba (`cache=True, nogil=True`, `prange` over rows/blocks);
forward/backward pairs side by side, llm.c style, writing into caller-owned
buffers; each backward says whether it writes or ADDS. Tests: tests/unit/test_kernels.py.

    embedding     token embedding
    rmsnorm       RMSNorm
    linear        x @ w.T + b (BLAS)
    rope          RoPE (HF rotate-half) fused with the QKV head split
    attention     fused causal GQA attention (BLAS tiles + numba softmax, no T x T kept)
    swiglu        silu(gate) * up
    residual      residual add
    crossentropy  fused softmax + cross-entropy with ignore_index
    optim         AdamW / SGD updates, grad sum of squares, scaling
    expf          a float32 exp numba can vectorize
    threads       one thread setting for BLAS and numba
    q8_0, q4, decode_matvec, decode_attention   inference kernels (see their docstrings)

Training runs OpenBLAS GEMMs and numba (OpenMP) kernels in turn on the same cores; each pool
must let go of the cores as soon as its call ends, or its spinning workers steal a core from the
other pool's next call (a 2-thread GEMM right after a numba kernel ran 36 ms instead of 26.5 ms
here). `TRAINING_POOL_ENV` says so; it must be in the environment before numpy loads OpenBLAS
and before the first numba parallel kernel loads libgomp: `cke-dist train` sets it first thing,
scripts call `training_pool_env()` before importing numpy (values already set are kept).

Decode is the opposite: a token opens hundreds of parallel regions of microseconds each, so the
workers must keep spinning between them (passive waits made SmolLM2 at 2 threads 4x slower), and
no worker may spin beside a decode that uses fewer threads than the pool has: a 2-thread pool
asked for 1 thread decoded the Llama-3.2-1B shape at 21 tok/s instead of 28. `decode_pool_env(n)`
sizes the pool to the threads asked for; `cke-dist generate/serve --threads N` set it first thing.

Compiled kernels are cached (numba `cache=True`) in one directory per version of this package's
kernel sources (a hash of them), unless NUMBA_CACHE_DIR is set: numba invalidates a cached
function only when its own file changes, so a cached caller kept running the old
code of a callee edited in another file (q8_0), silently; 1.5x slower in the case that found it.
"""
import hashlib
import os
import sys
from pathlib import Path


def _cache_dir() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(here.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cke-dist" / "numba"
    return str(root / h.hexdigest()[:16])


def serialize_cache_writes():
    """Hold a file lock while numba adds an entry to a cache index. Its save reads the index, picks
    the first free data-file number and writes both, unlocked: two processes compiling different
    signatures of one function at once (MPI ranks, a server beside its test) both pick file 1, and
    the index can end up naming the other signature's code, which segfaults when a later process
    loads it (seen three times, once in CI; a persistent crash until the cache was cleared).
    Called by the kernel modules every process imports (rmsnorm, q8_0), not here: importing numba
    here would load numpy's OpenBLAS before the pool settings above are in the environment."""
    import fcntl

    import inspect

    import numba
    from numba.core import caching
    cls = getattr(caching, "IndexDataCacheFile", None)
    save = getattr(cls, "save", None)
    if save is None or list(inspect.signature(save).parameters)[:3] != ["self", "key", "data"]:
        raise RuntimeError(f"numba {numba.__version__}: numba.core.caching.IndexDataCacheFile.save(self, key, "
                           f"data) is not there, so cke_kernels cannot lock numba's cache writes; install the "
                           f"numba range pyproject.toml names")
    if getattr(cls.save, "cke_locked", False):
        return
    save = cls.save

    def locked_save(self, key, data):
        with open(self._index_path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)       # released when the file closes
            return save(self, key, data)
    locked_save.cke_locked = True
    cls.save = locked_save


if not os.environ.get("NUMBA_CACHE_DIR"):
    os.environ["NUMBA_CACHE_DIR"] = _cache_dir()
    if "numba" in sys.modules:      # numba read its config already: tell it too
        import numba.core.config
        numba.core.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

# The environment variables that size the thread pools (OpenMP, OpenBLAS, MKL, numba), read once when
# each library loads: the project's one list of them (benches, tests, `cke-dist info`, decode_pool_env).
# Here, not in threads.py, so it is importable before numpy: threads.py loads numba.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")

TRAINING_POOL_ENV = {
    # OpenBLAS workers spin for 2^28 cycles after a GEMM by default; 2^4: they sleep at once
    # (waking them costs microseconds, a training GEMM takes milliseconds)
    "OPENBLAS_THREAD_TIMEOUT": "4",
    # libgomp (numba's OpenMP layer) workers spin ~300k iterations after each parallel region;
    # passive: they block at once (a launch then costs ~10 us instead of ~1.5 us)
    "OMP_WAIT_POLICY": "PASSIVE",
}


def training_pool_env(env=None):
    """Put TRAINING_POOL_ENV's defaults into `env` (os.environ by default), keeping set values."""
    env = os.environ if env is None else env
    for k, v in TRAINING_POOL_ENV.items():
        env.setdefault(k, v)
    return env


def busy_cores(cores, window_s: float = 0.3) -> int:
    """How many of `cores` (cpu numbers) other work keeps busy: each cpu's non-idle share of a short
    window from /proc/stat, summed and rounded (0 where /proc/stat is unreadable). Call it while
    this process is idle."""
    def sample():
        out = {}
        try:
            with open("/proc/stat") as f:
                for line in f:
                    name, *vals = line.split()
                    if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                        v = [int(x) for x in vals]
                        out[int(name[3:])] = (sum(v), v[3] + (v[4] if len(v) > 4 else 0))   # total, idle+iowait
        except OSError:
            pass
        return out
    import time
    a = sample()
    time.sleep(window_s)
    b = sample()
    share = 0.0
    for c in a.keys() & b.keys():
        total, idle = b[c][0] - a[c][0], b[c][1] - a[c][1]
        if total > 0:
            share += 1.0 - idle / total
    return int(share + 0.5)


def default_decode_threads(env=None) -> tuple[int, str]:
    """Decode's thread count when none is asked for, and why: the cores this process may use
    (its affinity), less the ones other work keeps busy, shared by the ranks of this host. Decode
    workers spin between its short parallel regions, so one on a core another process holds waits
    for a descheduled thread at every region (a 30-token generate took 52 s at 2 threads, 9.5 s at
    1, beside one busy process)."""
    env = os.environ if env is None else env
    cores = sorted(os.sched_getaffinity(0))
    local = next((int(env[v]) for v in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
                  if env.get(v, "").isdigit() and int(env[v]) > 0), 1)
    # ranks of this job start together: their imports count as busy, so they are taken off
    busy = max(0, busy_cores(set(cores)) - (local - 1))
    n = max(1, (len(cores) - busy) // local)
    why = f"{len(cores)} core{'s' * (len(cores) > 1)} this process may use"
    if busy:
        why += f", {busy} busy with other work"
    if local > 1:
        why += f", {local} ranks on this host"
    return n, why


def decode_pool_env(threads: int, env=None):
    """Start numba's (and BLAS's) pools with exactly `threads` workers, unless already set."""
    env = os.environ if env is None else env
    for k in THREAD_VARS:
        env.setdefault(k, str(threads))
    return env
