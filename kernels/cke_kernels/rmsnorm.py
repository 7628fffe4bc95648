"""RMSNorm (Llama): out = w * x / sqrt(mean(x^2) + eps), row-wise over (N, C).

Rules: statistics in float64 per row, stored as rstd (N,) float32 for backward;
backward ADDS into dx (the residual stream's gradient) and into dw; dw sums
fixed chunks of rows (independent of the thread count) so results are
deterministic. Tests: tests/unit/test_kernels.py::test_rmsnorm.
"""
import numpy as np
from numba import njit, prange

from . import serialize_cache_writes

serialize_cache_writes()

_CHUNKS = 16


@njit(cache=True, nogil=True, parallel=True)
def rmsnorm_forward(x, w, eps, out, rstd):
    """x (N, C), w (C,) -> out (N, C), rstd (N,)."""
    n, c = x.shape
    for i in prange(n):
        ss = 0.0
        for j in range(c):
            v = np.float64(x[i, j])
            ss += v * v
        r = np.float32(1.0 / np.sqrt(ss / c + eps))
        rstd[i] = r
        for j in range(c):
            out[i, j] = w[j] * (x[i, j] * r)


@njit(cache=True, nogil=True, parallel=True)
def rmsnorm_backward(dout, x, w, rstd, dx, dw):
    """dx += d/dx, dw += d/dw for out = w * x * rstd."""
    n, c = x.shape
    nch = min(_CHUNKS, n)
    part = np.zeros((nch, c), dtype=np.float32)
    for ch in prange(nch):
        lo = ch * n // nch
        hi = (ch + 1) * n // nch
        for i in range(lo, hi):
            r = rstd[i]
            dot = 0.0
            for j in range(c):
                dot += np.float64(dout[i, j]) * w[j] * x[i, j]
            k = np.float32(dot * r * r * r / c)
            for j in range(c):
                part[ch, j] += dout[i, j] * x[i, j] * r
                dx[i, j] += r * w[j] * dout[i, j] - k * x[i, j]
    for ch in range(nch):
        for j in range(c):
            dw[j] += part[ch, j]
