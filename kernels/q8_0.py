"""Q8_0 weight-only quantization (GGML's Q8_0) and the products that read it.

Format: a (N, K) float32 weight, K a multiple of 32, becomes
  qs     (N, K)      int8     the values, q = round(w / d) in [-127, 127]
  scales (N, K//32)  float32  one d per block of 32 along K: d = fp16(max|w| / 127)
so w ~= qs * d blockwise. d is rounded to float16 (what GGML stores) *before*
the values are quantized against it, so every element keeps |w - q*d| <= d/2.
On disk the scales are float16 (cke_dist/model/decode.py save_q8_dir, written by
`cke-dist quantize`); in memory float32, so
the kernel needs no half-precision arithmetic.

Rules:
- q8_0_matvec reads the int8 blocks directly: no dequantized copy of the
  weight, ever. It serves the decode step (a few rows of activations at once,
  each weight row read once from memory for all of them).
- q8_0_matmul serves prefill: it dequantizes a tile of rows into a small
  scratch buffer and hands the GEMM to BLAS (no hand-written GEMM).
- no allocation in the hot path beyond the tile scratch and a 32-float lane
  accumulator per row; deterministic: each output is summed by one thread in a
  fixed order, whatever the thread count.
Tests: tests/test_q8_0.py.
"""
import numpy as np
from numba import njit, prange

BLOCK = 32
MATVEC_MAX_ROWS = 8        # above this many activation rows, the tiled BLAS path is faster
TILE_ROWS = 256            # weight rows dequantized per BLAS call in q8_0_matmul


def quantize_q8_0(w: np.ndarray):
    """(N, K) float -> (qs int8 (N, K), scales float32 (N, K//32)); scales hold float16-exact values."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"Q8_0 needs a 2-D weight whose last dim is a multiple of {BLOCK}, got shape {w.shape}")
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    d = (np.abs(blocks).max(axis=2) / 127.0).astype(np.float16)
    if not np.all(np.isfinite(d)):
        raise ValueError("Q8_0: weight has inf/NaN or a block max beyond float16 range (65504*127)")
    d = d.astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    qs = np.clip(np.rint(blocks * inv[:, :, None]), -127, 127).astype(np.int8)
    return qs.reshape(n, k), d


def dequantize_q8_0(qs: np.ndarray, scales: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    n, k = qs.shape
    r = (qs.reshape(n, k // BLOCK, BLOCK).astype(np.float32) * scales[:, :, None]).reshape(n, k)
    if out is None:
        return r
    out[...] = r
    return out


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _matvec(qs, scales, x, out):
    n_rows, k = qs.shape
    m_rows = x.shape[0]
    nb = k // 32
    for n in prange(n_rows):
        q = qs[n]
        sc = scales[n]
        # 32 lane accumulators across all blocks (scale folded in per element): LLVM vectorizes
        # this (int8 -> float32 convert + 2 FMAs per element); a per-block scalar sum does not.
        acc = np.empty(32, np.float32)
        for m in range(m_rows):
            xm = x[m]
            acc[:] = 0.0
            for b in range(nb):
                d = sc[b]
                base = b * 32
                for j in range(32):
                    acc[j] += np.float32(q[base + j]) * d * xm[base + j]
            t = np.float32(0.0)
            for j in range(32):
                t += acc[j]
            out[m, n] = t


def q8_0_matvec(qs, scales, x, out):
    """out (M, N) = x (M, K) @ dequant(qs, scales).T for small M (decode). All float32, C-contiguous."""
    if x.shape[1] != qs.shape[1] or out.shape != (x.shape[0], qs.shape[0]):
        raise ValueError(f"q8_0_matvec: x {x.shape}, weight {qs.shape}, out {out.shape} do not fit")
    _matvec(qs, scales, x, out)
    return out


def q8_0_matmul(qs, scales, x, out, scratch=None):
    """out (M, N) = x (M, K) @ dequant(qs, scales).T, any M: matvec for few rows, tiled BLAS otherwise."""
    m, k = x.shape
    n = qs.shape[0]
    if k != qs.shape[1] or out.shape != (m, n):
        raise ValueError(f"q8_0_matmul: x {x.shape}, weight {qs.shape}, out {out.shape} do not fit")
    if m <= MATVEC_MAX_ROWS:
        _matvec(qs, scales, x, out)
        return out
    if scratch is None or scratch.shape[1] != k or scratch.shape[0] < min(TILE_ROWS, n):
        scratch = np.empty((min(TILE_ROWS, n), k), np.float32)
    for r0 in range(0, n, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, n)
        tile = scratch[: r1 - r0]
        _dequant_rows(qs, scales, r0, r1, tile)
        np.matmul(x, tile.T, out=out[:, r0:r1])
    return out


@njit(parallel=True, nogil=True, cache=True)
def _dequant_rows(qs, scales, r0, r1, out):
    k = qs.shape[1]
    for i in prange(r1 - r0):
        for j in range(k):
            out[i, j] = np.float32(qs[r0 + i, j]) * scales[r0 + i, j // 32]


@njit(nogil=True, cache=True)
def q8_0_gather_rows(qs, scales, ids, out):
    """out (M, K) = dequantized rows ids (M,) of a Q8_0 matrix: the embedding lookup of a Q8_0 table."""
    k = qs.shape[1]
    for i in range(ids.shape[0]):
        r = ids[i]
        for j in range(k):
            out[i, j] = np.float32(qs[r, j]) * scales[r, j // 32]
    return out
