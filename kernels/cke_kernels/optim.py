"""Fused optimizer updates over flat float32 buffers (torch.optim semantics).

Rules: one pass over parameters, gradients and state, in place, parallel over
fixed blocks; hyper-parameters arrive as plain floats (the caller does bias
correction bookkeeping). Grad norm sums squares in float64 per fixed block, then
the blocks in order, so it is deterministic for any thread count.
Tests: tests/unit/test_kernels.py::test_adamw / test_sgd / test_grad_norm.
"""
import numpy as np
from numba import njit, prange

from .expf import FAST

_BLOCK = 1 << 16


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bc1, bc2):
    """torch.optim.AdamW: p *= 1 - lr*wd; m, v moments; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)."""
    n = p.size
    decay = np.float32(1.0 - lr * weight_decay)
    step = np.float32(lr / bc1)
    rbc2 = np.float32(1.0 / np.sqrt(bc2))
    b1 = np.float32(beta1)
    b2 = np.float32(beta2)
    c1 = np.float32(1.0 - beta1)
    c2 = np.float32(1.0 - beta2)
    e = np.float32(eps)
    nb = (n + _BLOCK - 1) // _BLOCK
    for blk in prange(nb):
        lo = blk * _BLOCK
        hi = min(n, lo + _BLOCK)
        for i in range(lo, hi):
            gi = g[i]
            mi = b1 * m[i] + c1 * gi
            vi = b2 * v[i] + c2 * gi * gi
            m[i] = mi
            v[i] = vi
            p[i] = p[i] * decay - step * mi / (np.sqrt(vi) * rbc2 + e)


@njit(cache=True, nogil=True, parallel=True)
def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """torch.optim.SGD: d = g + wd*p; buf = d (first step) or momentum*buf + (1-dampening)*d."""
    n = p.size
    lr32 = np.float32(lr)
    mom = np.float32(momentum)
    damp = np.float32(1.0 - dampening)
    wd = np.float32(weight_decay)
    nb = (n + _BLOCK - 1) // _BLOCK
    for blk in prange(nb):
        lo = blk * _BLOCK
        hi = min(n, lo + _BLOCK)
        for i in range(lo, hi):
            d = g[i]
            if weight_decay != 0.0:
                d = d + wd * p[i]
            if momentum != 0.0:
                if first:
                    b = d
                else:
                    b = mom * buf[i] + damp * d
                buf[i] = b
                if nesterov:
                    d = d + mom * b
                else:
                    d = b
            p[i] = p[i] - lr32 * d


@njit(cache=True, nogil=True, parallel=True)
def sum_squares(g):
    """Sum of g**2 in float64, blockwise then in block order."""
    n = g.size
    nb = (n + _BLOCK - 1) // _BLOCK
    part = np.zeros(nb, dtype=np.float64)
    for blk in prange(nb):
        lo = blk * _BLOCK
        hi = min(n, lo + _BLOCK)
        s = 0.0
        for i in range(lo, hi):
            x = np.float64(g[i])
            s += x * x
        part[blk] = s
    total = 0.0
    for blk in range(nb):
        total += part[blk]
    return total


@njit(cache=True, nogil=True, parallel=True)
def scale_inplace(g, s):
    s32 = np.float32(s)
    for i in prange(g.size):
        g[i] *= s32
