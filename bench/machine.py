"""What the machine can do, measured in the bench's own run: read bandwidth and float32 matmul peak.

    from machine import read_bandwidth, matmul_peak
    read_bandwidth(np.ones(2**28, np.float32))     # bytes/s, median of repeats, at the current threads
    matmul_peak([(2048, 512, 2816)])                # best FLOP/s of numpy GEMMs of these (N, K, M)

README tables print these beside their ratios, since these machines drift run to run.
"""
import time

import numpy as np
from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _read_all(a):
    s = np.float32(0.0)
    for i in prange(a.size):
        s += a[i]
    return s


def read_bandwidth(buf, repeats=7):
    """Read bandwidth in bytes/s (median) at the current thread count."""
    _read_all(buf)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _read_all(buf)
        times.append(time.perf_counter() - t0)
    return buf.nbytes / float(np.median(times))


def matmul_peak(shapes, repeats=3):
    """Best float32 GEMM FLOP/s over (N, K, M) shapes (N x K @ K x M, numpy's BLAS): the fastest of
    `repeats` runs of each, since a peak is what the machine does when nothing interferes."""
    best = 0.0
    for n, k, m in shapes:
        a = np.random.default_rng(0).standard_normal((n, k), dtype=np.float32)
        b = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
        out = np.empty((n, m), np.float32)
        np.matmul(a, b.T, out=out)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.matmul(a, b.T, out=out)
            times.append(time.perf_counter() - t0)
        best = max(best, 2.0 * n * k * m / min(times))
    return best


def machine_line(s) -> str:
    """Read bandwidth and numpy matmul peak at 1 thread over a bench shape's GEMMs (s: FULL/SMALL dict)."""
    from cke_kernels.threads import set_num_threads
    from threadpoolctl import threadpool_limits

    set_num_threads(1)
    with threadpool_limits(1):
        bw = read_bandwidth(np.ones(2**28, np.float32))
        n, C, I = s["batch"] * s["seq"], s["hidden"], s["intermediate"]
        peak = matmul_peak([(n, C, 2 * I), (n, I, C), (n, C, s["vocab"])])
    return f"machine, 1 thread: read bandwidth {bw / 1e9:.1f} GB/s, numpy float32 matmul peak {peak / 1e9:.1f} GFLOP/s"
