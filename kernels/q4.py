"""Q4_0 and Q4_1 weights (GGML's 4-bit formats), kept 4-bit in memory, and the products that read them.

Format of a (N, K) float32 weight, K a multiple of 32, blocks of 32 along K:
  packed (N, K//2) uint8    per block 16 bytes; byte j holds value j in its low nibble and value
                            j + 16 in its high nibble (llama.cpp's block_q4_0 / block_q4_1 order,
                            so a GGUF tensor is repacked by a reshape, never requantized)
  d      (N, K//32) float32 the block scale (a float16 value, as the file stores it)
  m      (N, K//32) float32 Q4_1 only: the block minimum (float16 value)
Q4_0: w ~= (q - 8) * d, q in 0..15; Q4_1: w ~= q * d + m.
Quantization is llama.cpp's reference (and gguf's Python port): Q4_0 takes d = v / -8 of the value
v of largest magnitude, Q4_1 d = (max - min) / 15; tests/test_q4.py checks bit equality with gguf.

Products: as Q8_0's (cke_kernels/q8_0.py), few activation rows (decode) are quantized to Q8_0
blocks first and each weight block is an exact integer dot, scaled once (Q4_1 adds m times the
block's activation sum); each output is one thread's sum in a fixed order. Many rows (prefill)
dequantize a tile and use BLAS. The dot here is plain numba (no hand-written SIMD yet: it is
compute-bound; see the README's known limits).
Tests: tests/test_q4.py.
"""
import numpy as np
from numba import njit, prange

from .q8_0 import BLOCK, MATVEC_MAX_ROWS, quantize_rows

TILE_ROWS = 256


def quantize_q4(w: np.ndarray, kind: str):
    """(N, K) float -> (packed uint8 (N, K/2), d float32 (N, K/32), m float32 (N, K/32) or None)."""
    w = np.asarray(w, dtype=np.float32)
    if kind not in ("q4_0", "q4_1"):
        raise ValueError(f"4-bit kind {kind!r}: q4_0 or q4_1")
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"{kind.upper()} needs a 2-D weight whose last dim is a multiple of {BLOCK}, got {w.shape}")
    n, k = w.shape
    b = w.reshape(n, k // BLOCK, BLOCK)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "q4_0":
            imax = np.abs(b).argmax(axis=-1)[..., None]
            d = np.take_along_axis(b, imax, axis=-1) / np.float32(-8)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc(b * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
            m = None
        else:
            lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
            d = (hi - lo) / np.float32(15)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc((b - lo) * inv + np.float32(0.5)).astype(np.uint8).clip(0, 15)
            m = lo[..., 0].astype(np.float16).astype(np.float32)
    if not np.all(np.isfinite(d)):
        raise ValueError(f"{kind.upper()}: weight has inf/NaN")
    packed = (q[..., :16] | (q[..., 16:] << np.uint8(4))).reshape(n, k // 2)
    return packed, d[..., 0].astype(np.float16).astype(np.float32), m


def dequantize_q4(packed, d, m=None) -> np.ndarray:
    n, half = packed.shape
    p = packed.reshape(n, half // 16, 16)
    q = np.concatenate([p & 0x0F, p >> 4], axis=-1).astype(np.float32)
    if m is None:
        return ((q - 8) * d[..., None]).reshape(n, 2 * half)
    return (q * d[..., None] + m[..., None]).reshape(n, 2 * half)


@njit(nogil=True, cache=True)
def _block_sums(xq, xd, xs):
    """xs (M, K/32) = each activation block's sum in float (its scale times the int sum): Q4_1's m term."""
    m_rows, k = xq.shape
    for i in range(m_rows):
        for b in range(k // BLOCK):
            s = 0
            for j in range(b * BLOCK, (b + 1) * BLOCK):
                s += np.int32(xq[i, j])
            xs[i, b] = xd[i, b] * np.float32(s)


@njit(parallel=True, nogil=True, cache=True)
def _matvec(packed, d, mins, has_min, x, out):
    m_rows, k = x.shape
    nb = k // BLOCK
    xq = np.empty((m_rows, k), np.int8)
    xd = np.empty((m_rows, nb), np.float32)
    quantize_rows(x, xq, xd)
    xs = np.zeros((m_rows, nb), np.float32)
    if has_min:
        _block_sums(xq, xd, xs)
    off = np.int32(0) if has_min else np.int32(8)
    for n in prange(packed.shape[0]):
        for i in range(m_rows):
            acc = np.float32(0.0)
            for b in range(nb):
                s = np.int32(0)
                base = b * 16
                xb = b * BLOCK
                for j in range(16):
                    byte = np.int32(packed[n, base + j])
                    s += ((byte & 15) - off) * np.int32(xq[i, xb + j]) + ((byte >> 4) - off) * np.int32(xq[i, xb + 16 + j])
                acc += d[n, b] * xd[i, b] * np.float32(s)
                if has_min:
                    acc += mins[n, b] * xs[i, b]
            out[i, n] = acc


@njit(parallel=True, nogil=True, cache=True)
def _dequant_rows(packed, d, mins, has_min, r0, r1, out):
    nb = d.shape[1]
    for i in prange(r1 - r0):
        r = r0 + i
        for b in range(nb):
            for j in range(16):
                byte = packed[r, b * 16 + j]
                lo, hi = np.float32(byte & 15), np.float32(byte >> 4)
                if has_min:
                    out[i, b * BLOCK + j] = lo * d[r, b] + mins[r, b]
                    out[i, b * BLOCK + 16 + j] = hi * d[r, b] + mins[r, b]
                else:
                    out[i, b * BLOCK + j] = (lo - np.float32(8)) * d[r, b]
                    out[i, b * BLOCK + 16 + j] = (hi - np.float32(8)) * d[r, b]


_NO_MIN = np.zeros((1, 1), np.float32)


def q4_matmul(packed, d, m, x, out):
    """out (M, N) = x (M, K) @ dequant(packed, d, m).T: the integer path for few rows, tiled BLAS else."""
    n, half = packed.shape
    rows, k = x.shape
    if k != 2 * half or out.shape != (rows, n) or d.shape != (n, k // BLOCK):
        raise ValueError(f"q4_matmul: x {x.shape}, weight {packed.shape} (packed), scales {d.shape}, "
                         f"out {out.shape} do not fit")
    mins = _NO_MIN if m is None else m
    if rows <= MATVEC_MAX_ROWS:
        _matvec(packed, d, mins, m is not None, np.ascontiguousarray(x, dtype=np.float32), out)
        return out
    tile = np.empty((min(TILE_ROWS, n), k), np.float32)
    for r0 in range(0, n, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, n)
        _dequant_rows(packed, d, mins, m is not None, r0, r1, tile[:r1 - r0])
        np.matmul(x, tile[:r1 - r0].T, out=out[:, r0:r1])
    return out


@njit(nogil=True, cache=True)
def q4_gather_rows(packed, d, mins, has_min, ids, out):
    """out (M, K) = dequantized rows ids of a 4-bit matrix: the embedding lookup of a 4-bit table."""
    nb = d.shape[1]
    for i in range(ids.shape[0]):
        r = ids[i]
        for b in range(nb):
            for j in range(16):
                byte = packed[r, b * 16 + j]
                lo, hi = np.float32(byte & 15), np.float32(byte >> 4)
                if has_min:
                    out[i, b * BLOCK + j] = lo * d[r, b] + mins[r, b]
                    out[i, b * BLOCK + 16 + j] = hi * d[r, b] + mins[r, b]
                else:
                    out[i, b * BLOCK + j] = (lo - np.float32(8)) * d[r, b]
                    out[i, b * BLOCK + 16 + j] = (hi - np.float32(8)) * d[r, b]
    return out
