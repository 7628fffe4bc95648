"""One thread setting for every kernel: numpy's BLAS (through threadpoolctl) and numba.

Rules: `set_num_threads(n)` is the only place the project changes thread counts;
numba can not go above the NUMBA_NUM_THREADS it started with, so asking for more
is an error that says how to start the process instead of a silent cap.
"""
import numba
from threadpoolctl import threadpool_limits

_blas_limit = None  # kept alive: threadpoolctl restores the old limit when it is collected


def set_num_threads(n: int) -> int:
    """Use `n` threads for BLAS GEMMs and numba kernels; returns n."""
    global _blas_limit
    n = int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    most = numba.config.NUMBA_NUM_THREADS
    if n > most:
        raise ValueError(
            f"threads={n} but numba was started with NUMBA_NUM_THREADS={most}; "
            f"start the process with NUMBA_NUM_THREADS={n} (or more) in its environment")
    _blas_limit = threadpool_limits(limits=n, user_api="blas")
    numba.set_num_threads(n)
    return n


def get_num_threads() -> int:
    return numba.get_num_threads()
