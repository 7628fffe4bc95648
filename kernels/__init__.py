"""Single-node fused kernels: pure functions on numpy arrays (no MPI, no models).

Rules every module keeps: float32 compute; GEMMs through numpy's BLAS with out=,
everything else in numba (`cache=True, nogil=True`, `prange` over rows/blocks);
forward/backward pairs side by side, llm.c style, writing into caller-owned
buffers; each backward says whether it writes or ADDS. Tests: tests/test_kernels.py.

    embedding     token embedding
    rmsnorm       RMSNorm
    linear        x @ w.T + b (BLAS)
    rope          RoPE (HF rotate-half) fused with the QKV head split
    attention     causal GQA attention (batched BLAS + numba softmax)
    swiglu        silu(gate) * up
    residual      residual add
    crossentropy  fused softmax + cross-entropy with ignore_index
    optim         AdamW / SGD updates, grad sum of squares, scaling
    expf          a float32 exp numba can vectorize
    threads       one thread setting for BLAS and numba
    q8_0, decode_attention   inference kernels (see their docstrings)

Training runs OpenBLAS GEMMs and numba (OpenMP) kernels in turn on the same cores; each pool
must let go of the cores as soon as its call ends, or its spinning workers steal a core from the
other pool's next call (a 2-thread GEMM right after a numba kernel ran 36 ms instead of 26.5 ms
here). `TRAINING_POOL_ENV` says so; it must be in the environment before numpy loads OpenBLAS
and before the first numba parallel kernel loads libgomp: `cke-dist train` sets it first thing,
scripts call `training_pool_env()` before importing numpy (values already set are kept).
"""
import os

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
