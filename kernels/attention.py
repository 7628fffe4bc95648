"""Causal self-attention with grouped-query heads, on (B, heads, T, D) blocks.

Scores and outputs are batched numpy GEMMs: the G = n_head / n_kv query heads of
one key/value head are stacked into a (G*T, D) block, so GQA needs no copies of
K and V and dK/dV sum over the group inside the GEMM. numba does the causal
softmax (row t of a block sees keys 0..t) and its backward, in place.

Rules: `att` (B, n_head, T, T) keeps the probabilities for backward; entries
above the diagonal are exactly 0. All outputs are written, not added.
Tests: tests/test_kernels.py::test_attention.
"""
import numpy as np
from numba import njit, prange

from .expf import FAST, expf


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def causal_softmax_forward(att, scale):
    """att (R, T) raw scores, row r at position r % T -> probabilities, in place."""
    R, T = att.shape
    for r in prange(R):
        t = r % T
        row = att[r]
        m = row[0]
        for j in range(1, t + 1):
            m = max(m, row[j])
        m = m * scale  # scale > 0, so the max of the scaled row
        s = np.float32(0.0)
        for j in range(t + 1):
            e = expf(row[j] * scale - m)
            row[j] = e
            s += e
        inv = np.float32(1.0) / s
        for j in range(t + 1):
            row[j] *= inv
        for j in range(t + 1, T):
            row[j] = 0.0


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def causal_softmax_backward(att, datt, scale):
    """datt (R, T): d/dprobs in, d/draw-scores out (in place)."""
    R, T = att.shape
    for r in prange(R):
        t = r % T
        p = att[r]
        d = datt[r]
        dot = np.float32(0.0)
        for j in range(t + 1):
            dot += p[j] * d[j]
        for j in range(t + 1):
            d[j] = p[j] * (d[j] - dot) * scale
        for j in range(t + 1, T):
            d[j] = 0.0


def attention_forward(q, k, v, scale, att, out):
    """q (B, H, T, D), k, v (B, KV, T, D) -> att (B, H, T, T) probabilities, out (B, H, T, D)."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    G = H // KV
    a = att.reshape(B, KV, G * T, T)
    np.matmul(q.reshape(B, KV, G * T, D), k.transpose(0, 1, 3, 2), out=a)
    causal_softmax_forward(att.reshape(B * H * T, T), np.float32(scale))
    np.matmul(a, v, out=out.reshape(B, KV, G * T, D))


def attention_backward(dout, q, k, v, att, scale, dq, dk, dv, datt):
    """dout (B, H, T, D) -> dq (B, H, T, D), dk, dv (B, KV, T, D); datt (B, H, T, T) is scratch."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    G = H // KV
    a = att.reshape(B, KV, G * T, T)
    da = datt.reshape(B, KV, G * T, T)
    dg = dout.reshape(B, KV, G * T, D)
    np.matmul(dg, v.transpose(0, 1, 3, 2), out=da)
    np.matmul(a.transpose(0, 1, 3, 2), dg, out=dv)
    causal_softmax_backward(att.reshape(B * H * T, T), datt.reshape(B * H * T, T), np.float32(scale))
    np.matmul(da, k, out=dq.reshape(B, KV, G * T, D))
    np.matmul(da.transpose(0, 1, 3, 2), q.reshape(B, KV, G * T, D), out=dk)
