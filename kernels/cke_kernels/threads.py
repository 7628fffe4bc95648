"""One thread setting for every kernel: numpy's BLAS (through threadpoolctl) and numba.

Rules: `set_num_threads(n)` is the only place the project changes thread counts;
numba can not go above the NUMBA_NUM_THREADS it started with, so asking for more
is an error that says how to start the process instead of a silent cap. The environment variables
that size the pools at start are `cke_kernels.THREAD_VARS` (in the package init: importing this
module loads numba and numpy, too late to set them).
"""
import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numba.np.ufunc.parallel as _numba_parallel
from threadpoolctl import ThreadpoolController, threadpool_limits

from . import TRAINING_POOL_ENV

_blas_limit = None  # kept alive: threadpoolctl restores the old limit when it is collected
_blas_libs = None   # threadpoolctl's controllers of the BLAS libraries loaded (found once)
_pool = None        # worker threads for split_rows, grown on demand
_training_pools = False


def use_training_pools() -> None:
    """Give this process training's pool wait policies (cke_kernels.TRAINING_POOL_ENV), whatever it
    imported first; once per process, from the first training batch (Model.forward_backward and the
    pipeline schedules).

    `cke-dist train` sets them in the environment before numpy loads; a script that imported numpy (or
    torch) first did not, and its OpenBLAS workers spin for 2^28 cycles after every GEMM on the core
    the next numba kernel needs. OpenBLAS re-reads its environment on request and restarts its
    workers lazily, so its timeout is applied now. libgomp reads OMP_WAIT_POLICY once, when numba
    starts its pool: set here if numba's pool has not started (it starts at the first parallel
    kernel); after that the policy stays what it is. Values the user set are kept."""
    global _training_pools, _blas_libs
    if _training_pools:
        return
    _training_pools = True
    if "OMP_WAIT_POLICY" not in os.environ and not _numba_parallel._is_initialized:
        os.environ["OMP_WAIT_POLICY"] = TRAINING_POOL_ENV["OMP_WAIT_POLICY"]
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = TRAINING_POOL_ENV["OPENBLAS_THREAD_TIMEOUT"]
    if _blas_libs is None:
        _blas_libs = ThreadpoolController().select(user_api="blas").lib_controllers
    for lib in _blas_libs:
        if lib.internal_api != "openblas":
            continue
        so = ctypes.CDLL(lib.filepath)      # already loaded: the same handle
        if hasattr(so, "openblas_read_env") and hasattr(so, "blas_thread_shutdown_"):
            so.openblas_read_env()           # the timeout is read from the environment here
            so.blas_thread_shutdown_()       # its workers restart with it at the next threaded GEMM


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


def split_rows(n: int, fn) -> None:
    """fn(lo, hi) over [0, n) in get_num_threads() contiguous parts run side by side, BLAS and numba
    at one thread inside each part.

    For work made of many small GEMMs (attention's per-head blocks): a 64 x 64 x T GEMM split over
    two BLAS threads pays a wake-up and a join per call and ran slower at 2 threads than at 1 here;
    a part per thread keeps each GEMM on one core. Each output is computed by one thread in the same
    order whatever the thread count. fn must release the GIL for its heavy work (numpy GEMMs and
    nogil numba kernels do)."""
    global _pool, _blas_libs
    parts = min(get_num_threads(), n)
    if parts <= 1:
        fn(0, n)
        return
    if _blas_libs is None:
        _blas_libs = ThreadpoolController().select(user_api="blas").lib_controllers
    if _pool is None or _pool._max_workers < parts - 1:
        _pool = ThreadPoolExecutor(parts - 1, thread_name_prefix="cke-split")
    saved = [lib.num_threads for lib in _blas_libs]
    for lib in _blas_libs:
        lib.set_num_threads(1)
    try:
        jobs = [_pool.submit(_one_thread, fn, i * n // parts, (i + 1) * n // parts) for i in range(1, parts)]
        _one_thread(fn, 0, n // parts)
        for job in jobs:
            job.result()
    finally:
        for lib, t in zip(_blas_libs, saved):
            lib.set_num_threads(t)


def _one_thread(fn, lo, hi):
    before = numba.get_num_threads()   # numba's count is per calling thread
    numba.set_num_threads(1)
    try:
        fn(lo, hi)
    finally:
        numba.set_num_threads(before)
