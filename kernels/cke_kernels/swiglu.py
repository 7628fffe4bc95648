"""SwiGLU: out = silu(gate) * up, with gate and up side by side in one (N, 2I)
buffer (the model computes gate_proj and up_proj as one GEMM).

Rules: silu(g) = g * sigmoid(g) in float32 (vectorized exp, cke_kernels.expf); backward writes dgu (N, 2I).
Tests: tests/unit/test_kernels.py::test_swiglu.
"""
import numpy as np
from numba import njit, prange

from .expf import FAST, expf


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def swiglu_forward(gu, out):
    """gu (N, 2I) = [gate | up] -> out (N, I)."""
    n, i2 = gu.shape
    m = i2 // 2
    for r in prange(n):
        for j in range(m):
            g = gu[r, j]
            s = np.float32(1.0) / (np.float32(1.0) + expf(-g))
            out[r, j] = g * s * gu[r, m + j]


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def swiglu_backward(dout, gu, dgu):
    """dout (N, I) -> dgu (N, 2I) = [dgate | dup]."""
    n, i2 = gu.shape
    m = i2 // 2
    one = np.float32(1.0)
    for r in prange(n):
        for j in range(m):
            g = gu[r, j]
            u = gu[r, m + j]
            s = one / (one + expf(-g))
            d = dout[r, j]
            dgu[r, j] = d * u * s * (one + g * (one - s))
            dgu[r, m + j] = d * g * s
