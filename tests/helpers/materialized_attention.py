"""The reference for cke_kernels.attention (tests/unit/test_kernels.py): causal self-attention with
grouped-query heads that keeps the (B, heads, T, T) probabilities, the model's kernel until the fused
one replaced it (the same numbers to 1e-6, without the T^2 memory).

Scores and outputs are numpy GEMMs over query blocks of `block` rows: query
block [r0, r1) only meets keys [0, r1), so the score blocks above the diagonal
(nearly half of every attention GEMM at T=256) are never computed. The G =
n_head / n_kv query heads of one key/value head broadcast over one K/V head, so
GQA needs no copies of K and V; dK/dV sum the G heads with one add per head.
numba does the causal softmax (row t of a block sees keys 0..t) and its
backward, in place. Packed sequences (several documents in one row) pass `starts` (B, T): query t
sees keys starts[b, t]..t only, so attention never crosses a document boundary. Only the softmax
masks: the GEMMs still cover the whole lower triangle, and the zero probabilities (and zero score
gradients) outside a document are what keeps the others' keys, values and gradients out.
With several threads the batch is split between them (cke_kernels.threads.
split_rows): each thread runs its sequences' GEMMs and softmax on one core,
since these GEMMs are too small to split well over BLAS threads.

Rules: `att` (B, n_head, T, T) keeps the probabilities for backward; entries
above the diagonal (and, with `starts`, before a query's document) are exactly 0 (the softmax writes them; the GEMMs never read
them). All outputs are written, not added. `out` (forward) and `dout`
(backward) may be strided views (e.g. token rows (B, T, H, D) transposed), as
long as the last axis has unit stride: the model reads and writes its token-row
buffers directly, with no head merge/split copies.
"""
import numpy as np
from numba import njit, prange

from cke_kernels.expf import FAST, expf, rowmax
from cke_kernels.threads import split_rows

BLOCK = 64   # query/key block: GEMMs of 64 x 64 x (<= T) still run near BLAS speed, and T=256 skips 3/8 of the work


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def causal_softmax_forward(att, scale):
    """att (R, T) raw scores, row r at position r % T -> probabilities, in place."""
    R, T = att.shape
    for r in prange(R):
        t = r % T
        row = att[r]
        m = rowmax(row, t + 1) * scale  # scale > 0, so the max of the scaled row
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


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def masked_softmax_forward(att, scale, starts):
    """causal_softmax_forward where row r (sequence b = r // (R / B), position t) sees keys
    starts[b, t]..t only; att (R, T), starts (B, T) with 0 <= starts[b, t] <= t. The plain causal
    kernel stays separate so unpacked batches pay nothing for the mask."""
    R, T = att.shape
    per = R // starts.shape[0]
    for r in prange(R):
        t = r % T
        j0 = starts[r // per, t]
        row = att[r]
        m = rowmax(row[j0:], t + 1 - j0) * scale
        s = np.float32(0.0)
        for j in range(j0, t + 1):
            e = expf(row[j] * scale - m)
            row[j] = e
            s += e
        inv = np.float32(1.0) / s
        for j in range(j0, t + 1):
            row[j] *= inv
        for j in range(j0):
            row[j] = 0.0
        for j in range(t + 1, T):
            row[j] = 0.0


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def masked_softmax_backward(att, datt, scale, starts):
    """causal_softmax_backward for masked_softmax_forward's rows: zero outside starts[b, t]..t."""
    R, T = att.shape
    per = R // starts.shape[0]
    for r in prange(R):
        t = r % T
        j0 = starts[r // per, t]
        p = att[r]
        d = datt[r]
        dot = np.float32(0.0)
        for j in range(j0, t + 1):
            dot += p[j] * d[j]
        for j in range(j0, t + 1):
            d[j] = p[j] * (d[j] - dot) * scale
        for j in range(j0):
            d[j] = 0.0
        for j in range(t + 1, T):
            d[j] = 0.0


def _check_starts(starts, B, T):
    if starts is None:
        return
    if starts.shape != (B, T) or starts.dtype != np.int64:
        raise ValueError(f"attention starts must be int64 of shape {(B, T)}, got {starts.dtype} {starts.shape}")


def _split_heads(a, kv):
    """(B, H, T, X) -> (B, KV, G, T, X) as a view; raises rather than silently copying a strided array."""
    B, H, T, X = a.shape
    v = a.view()
    v.shape = (B, kv, H // kv, T, X)
    return v


def _blocks(T, block):
    if block < 1:
        raise ValueError(f"attention block must be >= 1, got {block}")
    return [(r0, min(T, r0 + block)) for r0 in range(0, T, block)]


def attention_forward(q, k, v, scale, att, out, block=BLOCK, starts=None):
    """q (B, H, T, D), k, v (B, KV, T, D) -> att (B, H, T, T) probabilities, out (B, H, T, D).
    starts: None (causal) or int64 (B, T), the first key each query sees (its document's start)."""
    _blocks(q.shape[2], block)   # a bad block size raises here, not in a worker thread
    _check_starts(starts, q.shape[0], q.shape[2])
    split_rows(q.shape[0], lambda b0, b1: _forward(q[b0:b1], k[b0:b1], v[b0:b1], scale, att[b0:b1],
                                                   out[b0:b1], block, None if starts is None else starts[b0:b1]))


def _forward(q, k, v, scale, att, out, block, starts):
    B, H, T, D = q.shape
    KV = k.shape[1]
    q5, a5, o5 = _split_heads(q, KV), _split_heads(att, KV), _split_heads(out, KV)
    kT, v5 = k[:, :, None].swapaxes(-1, -2), v[:, :, None]
    blocks = _blocks(T, block)
    for r0, r1 in blocks:
        np.matmul(q5[:, :, :, r0:r1], kT[..., :r1], out=a5[:, :, :, r0:r1, :r1])
    if starts is None:
        causal_softmax_forward(att.reshape(B * H * T, T), np.float32(scale))
    else:
        masked_softmax_forward(att.reshape(B * H * T, T), np.float32(scale), starts)
    for r0, r1 in blocks:
        np.matmul(a5[:, :, :, r0:r1, :r1], v5[:, :, :, :r1], out=o5[:, :, :, r0:r1])


def _grad_kv(p5, g5, dst, blocks):
    """dst (B, KV, T, X) = sum over the G heads of p5[..., g, :, :].T @ g5[..., g, :, :], causal:
    key block [c0, c1) only receives from queries c0..T-1."""
    B, KV, G = p5.shape[:3]
    tmp = np.empty((B, KV, blocks[0][1] - blocks[0][0], dst.shape[-1]), np.float32) if G > 1 else None
    for c0, c1 in blocks:
        d = dst[:, :, c0:c1]
        np.matmul(p5[:, :, 0, c0:, c0:c1].swapaxes(-1, -2), g5[:, :, 0, c0:], out=d)
        for g in range(1, G):
            t = tmp[:, :, :c1 - c0]
            np.matmul(p5[:, :, g, c0:, c0:c1].swapaxes(-1, -2), g5[:, :, g, c0:], out=t)
            d += t


def attention_backward(dout, q, k, v, att, scale, dq, dk, dv, datt, block=BLOCK, starts=None):
    """dout (B, H, T, D) -> dq (B, H, T, D), dk, dv (B, KV, T, D); datt (B, H, T, T) is scratch;
    starts: the forward's."""
    _blocks(q.shape[2], block)
    _check_starts(starts, q.shape[0], q.shape[2])
    split_rows(q.shape[0], lambda b0, b1: _backward(dout[b0:b1], q[b0:b1], k[b0:b1], v[b0:b1], att[b0:b1],
                                                    scale, dq[b0:b1], dk[b0:b1], dv[b0:b1], datt[b0:b1],
                                                    block, None if starts is None else starts[b0:b1]))


def _backward(dout, q, k, v, att, scale, dq, dk, dv, datt, block, starts):
    B, H, T, D = q.shape
    KV = k.shape[1]
    a5, da5, g5 = _split_heads(att, KV), _split_heads(datt, KV), _split_heads(dout, KV)
    q5, dq5 = _split_heads(q, KV), _split_heads(dq, KV)
    vT, k5 = v[:, :, None].swapaxes(-1, -2), k[:, :, None]
    blocks = _blocks(T, block)
    for r0, r1 in blocks:
        np.matmul(g5[:, :, :, r0:r1], vT[..., :r1], out=da5[:, :, :, r0:r1, :r1])
    _grad_kv(a5, g5, dv, blocks)
    if starts is None:
        causal_softmax_backward(att.reshape(B * H * T, T), datt.reshape(B * H * T, T), np.float32(scale))
    else:
        masked_softmax_backward(att.reshape(B * H * T, T), datt.reshape(B * H * T, T), np.float32(scale), starts)
    for r0, r1 in blocks:
        np.matmul(da5[:, :, :, r0:r1, :r1], k5[:, :, :, :r1], out=dq5[:, :, :, r0:r1])
    _grad_kv(da5, q5, dk, blocks)
