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
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from .q8_0 import _CONTRACT, _I32, BLOCK, MATVEC_MAX_ROWS, _block_pair_sums, _lanes, _simd, quantize_rows

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


ROWS = 4       # weight rows per task (each activation block unpacked once for all of them)


def make_q4_dot(simd, rows, with_min):
    """A numba intrinsic q4_dot(q, qo, d, do, x, xo, xd, xdo, nb, m, xs) -> tuple of `rows` float32:
    `rows` consecutive rows of a packed 4-bit weight (16 bytes a block, row r at byte qo + r*16*nb)
    against one Q8_0 activation row. Per block: the 16 bytes split into 32 4-bit values in
    registers (low nibbles, then high: GGML's order), minus 8 for Q4_0, an exact integer dot with
    the activation block through the same pair sums as Q8_0's, scaled once by d_w * d_x; Q4_1 adds
    m_w * (the block's activation sum xs). Two vector accumulators per row, lanes summed in a fixed
    order at the end: the same bits for any thread count."""
    @intrinsic
    def q4_dot(typingctx, q, qo, d, do, x, xo, xd, xdo, nb, m, xs):
        for a, dt in ((q, types.uint8), (d, types.float32), (x, types.int8), (xd, types.float32),
                      (m, types.float32), (xs, types.float32)):
            if not (isinstance(a, types.Array) and a.layout == "C" and a.dtype == dt):
                raise errors.TypingError(f"q4_dot needs C-contiguous {dt} arrays, got {a}")
        ret = types.UniTuple(types.float32, rows)
        sig = ret(q, qo, d, do, x, xo, xd, xdo, nb, m, xs)

        def codegen(context, builder, signature, args):
            ptr = {i: context.make_array(signature.args[i])(context, builder, args[i]).data for i in (0, 2, 4, 6, 9, 10)}
            qo_, do_, xo_, xdo_, nb_ = (context.cast(builder, args[i], signature.args[i], types.int64)
                                        for i in (1, 3, 5, 7, 8))
            i64 = ir.IntType(64)
            const = lambda v: ir.Constant(i64, v)       # noqa: E731
            vf = ir.VectorType(ir.FloatType(), 8)
            v16 = ir.VectorType(ir.IntType(8), 16)
            v32p = ir.VectorType(ir.IntType(8), BLOCK).as_pointer()
            mask = ir.Constant(v16, [15] * 16)
            four = ir.Constant(v16, [4] * 16)
            eight = ir.Constant(ir.VectorType(ir.IntType(8), BLOCK), [8] * BLOCK)
            row_q = [builder.add(qo_, builder.mul(const(r * 16), nb_)) for r in range(rows)]
            row_s = [builder.add(do_, builder.mul(const(r), nb_)) for r in range(rows)]
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * 8)) for _ in range(2)]
                   for _ in range(rows)]
            macc = [cgutils.alloca_once_value(builder, ir.Constant(ir.FloatType(), 0.0)) for _ in range(rows)]

            def block(b, which):
                lx = builder.load(builder.bitcast(builder.gep(ptr[4], [builder.add(xo_, builder.mul(b, const(BLOCK)))]),
                                                  v32p), align=1)
                dx = builder.load(builder.gep(ptr[6], [builder.add(xdo_, b)]))
                sx = builder.load(builder.gep(ptr[10], [builder.add(xdo_, b)])) if with_min else None
                for r in range(rows):
                    at = builder.add(row_q[r], builder.mul(b, const(16)))
                    raw = builder.load(builder.bitcast(builder.gep(ptr[0], [at]), v16.as_pointer()), align=1)
                    lq = builder.shuffle_vector(builder.and_(raw, mask), builder.lshr(raw, four), _lanes(range(32)))
                    if not with_min:
                        lq = builder.sub(lq, eight)
                    f = builder.sitofp(_block_pair_sums(builder, lq, lx, simd), vf)
                    dd = builder.fmul(builder.load(builder.gep(ptr[2], [builder.add(row_s[r], b)])), dx)
                    dv = builder.insert_element(ir.Constant(vf, ir.Undefined), dd, ir.Constant(_I32, 0))
                    dv = builder.shuffle_vector(dv, dv, _lanes([0] * 8))
                    a = acc[r][which]
                    builder.store(builder.fadd(builder.load(a), builder.fmul(f, dv, flags=_CONTRACT),
                                               flags=_CONTRACT), a)
                    if with_min:
                        mw = builder.load(builder.gep(ptr[9], [builder.add(row_s[r], b)]))
                        builder.store(builder.fadd(builder.load(macc[r]), builder.fmul(mw, sx)), macc[r])

            pairs = builder.sdiv(nb_, const(2))
            with cgutils.for_range(builder, pairs) as loop:
                b0 = builder.mul(loop.index, const(2))
                block(b0, 0)
                block(builder.add(b0, const(1)), 1)
            with builder.if_then(builder.icmp_signed("!=", builder.mul(pairs, const(2)), nb_)):
                block(builder.sub(nb_, const(1)), 0)
            sums = []
            for r in range(rows):
                v = builder.fadd(builder.load(acc[r][0]), builder.load(acc[r][1]))
                t = builder.extract_element(v, ir.Constant(_I32, 0))
                for i in range(1, 8):
                    t = builder.fadd(t, builder.extract_element(v, ir.Constant(_I32, i)))
                sums.append(builder.fadd(t, builder.load(macc[r])) if with_min else t)
            return context.make_tuple(builder, ret, sums)
        return sig, codegen
    return q4_dot


_q4_0_rows, _q4_0_one = make_q4_dot(_simd(), ROWS, False), make_q4_dot(_simd(), 1, False)
_q4_1_rows, _q4_1_one = make_q4_dot(_simd(), ROWS, True), make_q4_dot(_simd(), 1, True)


def _make_matvec(dot_rows, dot_one, has_min):
    @njit(parallel=True, nogil=True, cache=True)
    def matvec(packed, d, mins, x, out):
        m_rows, k = x.shape
        nb = k // BLOCK
        xq = np.empty((m_rows, k), np.int8)
        xd = np.empty((m_rows, nb), np.float32)
        quantize_rows(x, xq, xd)
        xs = np.zeros((m_rows, nb), np.float32)
        if has_min:
            _block_sums(xq, xd, xs)
        n_rows = packed.shape[0]
        half = k // 2
        for t in prange((n_rows + ROWS - 1) // ROWS):
            n = ROWS * t
            for i in range(m_rows):
                if n + ROWS <= n_rows:
                    vals = dot_rows(packed, n * half, d, n * nb, xq, i * k, xd, i * nb, nb, mins, xs)
                    for r in range(ROWS):
                        out[i, n + r] = vals[r]
                else:
                    for r in range(n, n_rows):
                        out[i, r] = dot_one(packed, r * half, d, r * nb, xq, i * k, xd, i * nb, nb, mins, xs)[0]
    return matvec


_matvec_q4_0 = _make_matvec(_q4_0_rows, _q4_0_one, False)
_matvec_q4_1 = _make_matvec(_q4_1_rows, _q4_1_one, True)


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
        for name, a in (("packed", packed), ("d", d), ("m", mins)):
            if not a.flags.c_contiguous:   # the integer dot reads flat offsets
                raise ValueError(f"q4_matmul: {name} must be C-contiguous")
        mv = _matvec_q4_0 if m is None else _matvec_q4_1
        mv(packed, d, mins, np.ascontiguousarray(x, dtype=np.float32), out)
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
