"""Linear layer, torch layout: out = x @ w.T + b with w (out_features, in_features).

Rules: every GEMM is numpy's BLAS with out= into a preallocated buffer (never a
numba GEMM). Backward writes dx, and writes (accumulate=False) or ADDS
(accumulate=True) dw/db: the model writes straight into a freshly zeroed
gradient buffer and only pays the scratch + add when accumulating micro-batches.
Tests: tests/unit/test_kernels.py::test_linear.
"""
import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True)
def add_inplace(dst, src):
    """dst += src for flat-contiguous arrays of the same size."""
    d = dst.reshape(-1)
    s = src.reshape(-1)
    for i in prange(d.size):
        d[i] += s[i]


@njit(cache=True, nogil=True, parallel=True)
def _add_bias(out, b):
    n, c = out.shape
    for i in prange(n):
        for j in range(c):
            out[i, j] += b[j]


def linear_forward(x, w, b, out):
    """x (N, in), w (out, in), b (out,) or None -> out (N, out)."""
    np.matmul(x, w.T, out=out)
    if b is not None:
        _add_bias(out, b)


def linear_backward(dout, x, w, dx, dw, db, accumulate, scratch=None):
    """dout (N, out) -> dx (N, in) written (skipped when None); dw (out, in), db (out,) or None
    (dw None: the input gradient only, as a zero-bubble schedule's B pass runs it).

    accumulate=True ADDS into dw/db and needs `scratch`, a float32 buffer of at
    least dw.size elements.
    """
    if dx is not None:
        np.matmul(dout, w, out=dx)
    if dw is None:
        return
    if accumulate:
        tmp = scratch[: dw.size].reshape(dw.shape)
        np.matmul(dout.T, x, out=tmp)
        add_inplace(dw, tmp)
        if db is not None:
            db += dout.sum(axis=0)
    else:
        np.matmul(dout.T, x, out=dw)
        if db is not None:
            np.sum(dout, axis=0, out=db)
