"""Fused causal attention (FlashAttention's recipe on BLAS tiles): forward and backward that never hold
the (B, H, T, T) probabilities, with grouped-query heads and packed-document masks.

Work is cut into (sequence, KV head) units, split between threads (cke_kernels.threads.split_rows);
within a unit, queries go in tiles of `tile` rows, the G query heads of the KV head stacked into one
(G * tile, D) block, so every GEMM is one call on contiguous operands:

    forward    S = Q_t K[:r1]^T -> softmax rows in place (keeping each row's log-sum-exp) -> O_t = P V[:r1]
    backward   S again, P = exp(scale * S - lse); dP = dO_t V[:r1]^T; dS = P (dP - rowsum(dO_t O_t)) scale;
               dQ_t = dS K[:r1]; dK[:r1] += dS^T Q_t; dV[:r1] += P^T dO_t

A query tile [r0, r1) meets keys [0, r1) only (causal). The softmax runs over a tile's whole key range
at once rather than FlashAttention's running max over key blocks: a tile's scores are G x tile x T
floats (2 MiB per thread at T = 4096), and one GEMM per operand keeps BLAS near its peak. Memory is
O(B H T) (the log-sum-exp) plus one tile's scratch per thread, instead of O(B H T^2). Backward
recomputes the scores (one more GEMM than keeping them: FlashAttention's trade).

Packed rows pass `starts` (B, T), the first key each query sees; probabilities outside a query's
document, and above the diagonal, are exact zeros, so the GEMMs over them add nothing.
`out` (forward) and `dout` (backward) may be strided views with a unit-stride last axis (the
model's token rows seen as heads).
Tests: tests/unit/test_kernels.py::test_attention*.
"""
import numpy as np
from numba import njit

from .expf import FAST, expf, rowmax
from .threads import split_rows

TILE = 64   # query rows per tile: G x 64 x D blocks keep the GEMMs near BLAS speed and skip 3/8 of the
            # score work above the diagonal at T = 256


@njit(cache=True, nogil=True, fastmath=FAST)
def _softmax_tile(s, n, r0, starts_b, scale, lse):
    """s (G * n, W) raw scores of queries r0..r0+n-1 (row i: head i // n, position r0 + i % n) ->
    probabilities in place, zero outside [starts_b[t], t]; lse (G * n,) = log-sum-exp of the scaled row."""
    R, W = s.shape
    for i in range(R):
        t = r0 + i % n
        j0 = starts_b[t]
        row = s[i]
        m = rowmax(row[j0:], t + 1 - j0) * scale
        tot = np.float32(0.0)
        for j in range(j0, t + 1):
            e = expf(row[j] * scale - m)
            row[j] = e
            tot += e
        inv = np.float32(1.0) / tot
        for j in range(j0, t + 1):
            row[j] *= inv
        for j in range(j0):
            row[j] = 0.0
        for j in range(t + 1, W):
            row[j] = 0.0
        lse[i] = m + np.log(tot)


@njit(cache=True, nogil=True, fastmath=FAST)
def _softmax_tile_backward(s, dp, n, r0, starts_b, scale, lse, dout, out):
    """s: raw scores -> probabilities (exp(scale s - lse), recomputed); dp: dL/dP -> dL/dS (scaled), both
    zero outside [starts_b[t], t]; dout, out (G * n, D): the tile's output gradient and output."""
    R, W = s.shape
    D = dout.shape[1]
    for i in range(R):
        t = r0 + i % n
        j0 = starts_b[t]
        di = np.float32(0.0)
        for c in range(D):
            di += dout[i, c] * out[i, c]
        p, d = s[i], dp[i]
        li = lse[i]
        for j in range(j0, t + 1):
            pj = expf(p[j] * scale - li)
            p[j] = pj
            d[j] = pj * (d[j] - di) * scale
        for j in range(j0):
            p[j] = 0.0
            d[j] = 0.0
        for j in range(t + 1, W):
            p[j] = 0.0
            d[j] = 0.0


def _check(q, k, starts, tile):
    B, H, T, D = q.shape
    if tile < 1:
        raise ValueError(f"attention tile must be >= 1, got {tile}")
    if H % k.shape[1]:
        raise ValueError(f"{H} query heads do not group over {k.shape[1]} KV heads")
    if starts is not None and (starts.shape != (B, T) or starts.dtype != np.int64):
        raise ValueError(f"attention starts must be int64 of shape {(B, T)}, got {starts.dtype} {starts.shape}")


def _starts(starts, B, T):
    return np.zeros((B, T), np.int64) if starts is None else starts


def attention_forward(q, k, v, scale, out, lse, tile=TILE, starts=None):
    """q (B, H, T, D), k, v (B, KV, T, D) -> out (B, H, T, D), lse (B, H, T) float32 (each query's
    log-sum-exp of its scaled scores, what backward needs). starts: None (causal) or int64 (B, T)."""
    _check(q, k, starts, tile)
    B, H, T, D = q.shape
    KV = k.shape[1]
    st = _starts(starts, B, T)
    split_rows(B * KV, lambda u0, u1: _forward(q, k, v, np.float32(scale), out, lse, tile, st, u0, u1))


def _forward(q, k, v, scale, out, lse, tile, starts, u0, u1):
    B, H, T, D = q.shape
    KV = k.shape[1]
    G = H // KV
    n_max = min(tile, T)
    qt = np.empty((G * n_max, D), np.float32)
    ot = np.empty((G * n_max, D), np.float32)
    sbuf = np.empty(G * n_max * T, np.float32)
    lt = np.empty(G * n_max, np.float32)
    for u in range(u0, u1):
        b, kh = divmod(u, KV)
        h0 = kh * G
        kb, vb = k[b, kh], v[b, kh]
        for r0 in range(0, T, tile):
            r1 = min(T, r0 + tile)
            n = r1 - r0
            q_, o_, l_ = qt[:G * n].reshape(G, n, D), ot[:G * n], lt[:G * n]
            q_[...] = q[b, h0:h0 + G, r0:r1]
            s = sbuf[:G * n * r1].reshape(G * n, r1)
            np.matmul(qt[:G * n], kb[:r1].T, out=s)
            _softmax_tile(s, n, r0, starts[b], scale, l_)
            np.matmul(s, vb[:r1], out=o_)
            out[b, h0:h0 + G, r0:r1] = o_.reshape(G, n, D)
            lse[b, h0:h0 + G, r0:r1] = l_.reshape(G, n)


def attention_backward(dout, q, k, v, out, lse, scale, dq, dk, dv, tile=TILE, starts=None):
    """dout (B, H, T, D) -> dq (B, H, T, D), dk, dv (B, KV, T, D), all written; out and lse: the
    forward's; starts: the forward's."""
    _check(q, k, starts, tile)
    B, H, T, D = q.shape
    KV = k.shape[1]
    st = _starts(starts, B, T)
    split_rows(B * KV, lambda u0, u1: _backward(dout, q, k, v, out, lse, np.float32(scale), dq, dk, dv, tile,
                                                st, u0, u1))


def _backward(dout, q, k, v, out, lse, scale, dq, dk, dv, tile, starts, u0, u1):
    B, H, T, D = q.shape
    KV = k.shape[1]
    G = H // KV
    n_max = min(tile, T)
    qt, gt, ot, dqt = (np.empty((G * n_max, D), np.float32) for _ in range(4))
    sbuf, pbuf = np.empty(G * n_max * T, np.float32), np.empty(G * n_max * T, np.float32)
    tmp = np.empty((T, D), np.float32)
    lt = np.empty(G * n_max, np.float32)
    for u in range(u0, u1):
        b, kh = divmod(u, KV)
        h0 = kh * G
        kb, vb, dkb, dvb = k[b, kh], v[b, kh], dk[b, kh], dv[b, kh]
        dkb[...] = 0.0
        dvb[...] = 0.0
        for r0 in range(0, T, tile):
            r1 = min(T, r0 + tile)
            n, m = r1 - r0, G * (r1 - r0)
            qt[:m].reshape(G, n, D)[...] = q[b, h0:h0 + G, r0:r1]
            gt[:m].reshape(G, n, D)[...] = dout[b, h0:h0 + G, r0:r1]
            ot[:m].reshape(G, n, D)[...] = out[b, h0:h0 + G, r0:r1]
            lt[:m].reshape(G, n)[...] = lse[b, h0:h0 + G, r0:r1]
            s, dp = sbuf[:m * r1].reshape(m, r1), pbuf[:m * r1].reshape(m, r1)
            np.matmul(qt[:m], kb[:r1].T, out=s)
            np.matmul(gt[:m], vb[:r1].T, out=dp)
            _softmax_tile_backward(s, dp, n, r0, starts[b], scale, lt[:m], gt[:m], ot[:m])
            np.matmul(s.T, gt[:m], out=tmp[:r1])
            dvb[:r1] += tmp[:r1]
            np.matmul(dp.T, qt[:m], out=tmp[:r1])
            dkb[:r1] += tmp[:r1]
            np.matmul(dp, kb[:r1], out=dqt[:m])
            dq[b, h0:h0 + G, r0:r1] = dqt[:m].reshape(G, n, D)
