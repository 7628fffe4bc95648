"""Q4_0 and Q4_1 weights (GGML's 4-bit formats), kept 4-bit in memory, and the products that read them.

Format of a (N, K) float32 weight, K a multiple of 32, blocks of 32 along K:
  packed (N, K//2) uint8    per block 16 bytes; byte j holds value j in its low nibble and value
                            j + 16 in its high nibble (llama.cpp's block_q4_0 / block_q4_1 order,
                            so a GGUF tensor is repacked by a reshape, never requantized)
  d      (N, K//32) float32 the block scale (a float16 value, as the file stores it)
  m      (N, K//32) float32 Q4_1 only: the block minimum (float16 value)
Q4_0: w ~= (q - 8) * d, q in 0..15; Q4_1: w ~= q * d + m.
Quantization is llama.cpp's reference (and gguf's Python port): Q4_0 takes d = v / -8 of the value
v of largest magnitude, Q4_1 d = (max - min) / 15; tests/unit/test_q4.py checks bit equality with gguf.

Products: as Q8_0's (cke_kernels/q8_0.py), few activation rows (decode) are quantized to Q8_0
blocks first and each weight block is an exact integer dot, scaled once (Q4_1 adds m times the
block's activation sum); each output is one thread's sum in a fixed order. Many rows (prefill)
dequantize a tile and use BLAS. The dot is LLVM IR (make_q4_dot): two blocks a step, VNNI or
AVX2 integer multiply-adds, software prefetch PREFETCH bytes ahead, one weight row a task.
Tests: tests/unit/test_q4.py.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from .q8_0 import _CONTRACT, _I32, BLOCK, MATVEC_MAX_ROWS, PREFETCH, _lanes, _scaled_add, quantize_rows

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




def _simd4():
    """u8 x s8 dot instructions the CPU has: VNNI (vpdpbusd), AVX2 (pmaddubsw + pmaddwd), or none."""
    from llvmlite import binding as llvm
    from numba import config
    if config.CPU_NAME:
        return "generic"
    f = llvm.get_host_cpu_features()
    if f.get("avx512vnni") and f.get("avx512vl"):
        return "vnni"
    return "avx2" if f.get("avx2") else "generic"


def _nibble_dot(builder, u, x, simd, acc=None):
    """<32 x i8> u (unsigned 0..15), <32 x i8> x (signed) -> <8 x i32> (plus `acc` when given), lane
    l = sum of u[j]*x[j] over j = 4l..4l+3, exact; every variant groups the same j into the same lane."""
    v8 = ir.VectorType(_I32, 8)
    b32 = ir.VectorType(ir.IntType(8), BLOCK)
    zero = ir.Constant(v8, [0] * 8)
    if simd == "vnni":
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8, v8, v8]),
                                            "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(fn, [zero if acc is None else acc, builder.bitcast(u, v8), builder.bitcast(x, v8)])
    if simd == "avx2":
        h16 = ir.VectorType(ir.IntType(16), 16)
        mub = cgutils.get_or_insert_function(builder.module, ir.FunctionType(h16, [b32, b32]),
                                             "llvm.x86.avx2.pmadd.ub.sw")
        mwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [h16, h16]), "llvm.x86.avx2.pmadd.wd")
        s = builder.call(mwd, [builder.call(mub, [u, x]), ir.Constant(h16, [1] * 16)])
    else:
        w = ir.VectorType(_I32, BLOCK)
        p = builder.mul(builder.zext(u, w), builder.sext(x, w), flags=["nsw"])
        parts = [builder.shuffle_vector(p, p, _lanes(4 * lane + o for lane in range(8))) for o in range(4)]
        s = builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))
    return s if acc is None else builder.add(acc, s)


def make_q4_dot(simd, rows, prefetch=PREFETCH):
    """A numba intrinsic q4_dot(q, qo, d, do, z, x, xo, xd, xdo, zs, nb) -> tuple of `rows` float32:
    for `rows` consecutive rows of a packed 4-bit weight (16 bytes a block, row r at byte
    qo + r*16*nb; its scales d and zero-point factors z at do + r*nb) against one Q8_0 activation row
    in pair order (see _pair_order: x at xo, its scales xd and zero-point sums zs at xdo), the sum
    over blocks of d * xd * (unsigned nibbles . x) + z * zs. Q4_1: z = m, zs = the activation block
    sums; Q4_0: z = d, zs = -8 times them.

    Two blocks at a time: their 32 packed bytes masked give both blocks' low values, shifted both
    blocks' high values, each dotted (VNNI vpdpbusd, or AVX2 pmaddubsw + pmaddwd) with the 32
    activation bytes that _pair_order put opposite them; the 8 exact int32 lanes hold block b in
    lanes 0-3 and b + 1 in 4-7, converted once and multiplied by (d * xd) of the two blocks spread
    over their lanes. Per pair and row that is ~9 vector operations instead of ~20 for two
    single blocks (unpacking one block into 32 lanes and scaling it alone): the product is
    compute-bound on these CPUs. An odd last block goes alone. The activation bytes are loaded
    once for all rows; each row's lanes are summed in a fixed order at the end (deterministic)."""
    @intrinsic
    def q4_dot(typingctx, q, qo, d, do, z, x, xo, xd, xdo, zs, nb):
        for a, dt in ((q, types.uint8), (d, types.float32), (z, types.float32), (x, types.int8),
                      (xd, types.float32), (zs, types.float32)):
            if not (isinstance(a, types.Array) and a.layout == "C" and a.dtype == dt):
                raise errors.TypingError(f"q4_dot needs C-contiguous {dt} arrays, got {a}")
        ret = types.UniTuple(types.float32, rows)
        sig = ret(q, qo, d, do, z, x, xo, xd, xdo, zs, nb)

        def codegen(context, builder, signature, args):
            ptr = {i: context.make_array(signature.args[i])(context, builder, args[i]).data for i in (0, 2, 4, 5, 7, 9)}
            qo_, do_, xo_, xdo_, nb_ = (context.cast(builder, args[i], signature.args[i], types.int64)
                                        for i in (1, 3, 6, 8, 10))
            i64 = ir.IntType(64)
            const = lambda v: ir.Constant(i64, v)       # noqa: E731
            f32 = ir.FloatType()
            vf, v2 = ir.VectorType(f32, 8), ir.VectorType(f32, 2)
            v16, v32 = ir.VectorType(ir.IntType(8), 16), ir.VectorType(ir.IntType(8), BLOCK)
            row_q = [builder.add(qo_, builder.mul(const(r * 16), nb_)) for r in range(rows)]
            row_s = [builder.add(do_, builder.mul(const(r), nb_)) for r in range(rows)]
            acc = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * 8)) for _ in range(rows)]
            zacc = [cgutils.alloca_once_value(builder, ir.Constant(v2, [0.0] * 2)) for _ in range(rows)]

            def load(p, at, ty):
                return builder.load(builder.bitcast(builder.gep(p, [at]), ty.as_pointer()), align=1)

            def fma(a, x, y):
                builder.store(builder.fadd(builder.load(a), builder.fmul(x, y, flags=_CONTRACT), flags=_CONTRACT), a)

            pairs = builder.sdiv(nb_, const(2))
            pf = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                ir.VoidType(), [ir.PointerType(ir.IntType(8)), _I32, _I32, _I32]), "llvm.prefetch.p0")
            with cgutils.for_range(builder, pairs) as loop:
                b = builder.mul(loop.index, const(2))
                xa = builder.add(xo_, builder.mul(b, const(BLOCK)))
                x_lo, x_hi = load(ptr[5], xa, v32), load(ptr[5], builder.add(xa, const(BLOCK)), v32)
                dx = load(ptr[7], builder.add(xdo_, b), v2)
                zx = load(ptr[9], builder.add(xdo_, b), v2)
                for r in range(rows):
                    at = builder.add(row_q[r], builder.mul(b, const(16)))
                    if prefetch:
                        # `prefetch` bytes on in the weight stream (rows are adjacent: at K = 576 a
                        # row is 288 bytes, too short for the hardware prefetcher to ramp up alone)
                        builder.call(pf, [builder.gep(ptr[0], [builder.add(at, const(prefetch))]),
                                          ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
                    raw = load(ptr[0], at, v32)
                    lo = builder.and_(raw, ir.Constant(v32, [15] * BLOCK))
                    hi = builder.lshr(raw, ir.Constant(v32, [4] * BLOCK))
                    ints = _nibble_dot(builder, hi, x_hi, simd, _nibble_dot(builder, lo, x_lo, simd))
                    s2 = builder.fmul(load(ptr[2], builder.add(row_s[r], b), v2), dx)
                    fma(acc[r], builder.sitofp(ints, vf), builder.shuffle_vector(s2, s2, _lanes([0] * 4 + [1] * 4)))
                    fma(zacc[r], load(ptr[4], builder.add(row_s[r], b), v2), zx)
            with builder.if_then(builder.icmp_signed("!=", builder.mul(pairs, const(2)), nb_)):
                # the odd last block: its 16 bytes unpacked into 32 lanes against x in natural order
                b = builder.sub(nb_, const(1))
                xl = load(ptr[5], builder.add(xo_, builder.mul(b, const(BLOCK))), v32)
                dx = builder.load(builder.gep(ptr[7], [builder.add(xdo_, b)]))
                zx = builder.load(builder.gep(ptr[9], [builder.add(xdo_, b)]))
                for r in range(rows):
                    raw = load(ptr[0], builder.add(row_q[r], builder.mul(b, const(16))), v16)
                    u = builder.shuffle_vector(builder.and_(raw, ir.Constant(v16, [15] * 16)),
                                               builder.lshr(raw, ir.Constant(v16, [4] * 16)), _lanes(range(32)))
                    dd = builder.fmul(builder.load(builder.gep(ptr[2], [builder.add(row_s[r], b)])), dx)
                    _scaled_add(builder, acc[r], _nibble_dot(builder, u, xl, simd), dd)
                    zw = builder.load(builder.gep(ptr[4], [builder.add(row_s[r], b)]))
                    zv = builder.insert_element(ir.Constant(v2, [0.0, 0.0]), builder.fmul(zw, zx), ir.Constant(_I32, 0))
                    builder.store(builder.fadd(builder.load(zacc[r]), zv), zacc[r])
            out = []
            for a, za in zip(acc, zacc):
                v, zv = builder.load(a), builder.load(za)
                t = builder.extract_element(v, ir.Constant(_I32, 0))
                for i in range(1, 8):
                    t = builder.fadd(t, builder.extract_element(v, ir.Constant(_I32, i)))
                t = builder.fadd(t, builder.fadd(builder.extract_element(zv, ir.Constant(_I32, 0)),
                                                 builder.extract_element(zv, ir.Constant(_I32, 1))))
                out.append(t)
            return context.make_tuple(builder, ret, out)
        return sig, codegen
    return q4_dot


_q4_one = make_q4_dot(_simd4(), 1)


@njit(nogil=True, cache=True)
def _pair_order(xq):
    """Activation bytes reordered for make_q4_dot: per pair of blocks (b, b + 1), first the low
    halves [x_b[0:16], x_b+1[0:16]] (opposite the low nibbles of the pair's 32 packed bytes), then
    the high halves [x_b[16:32], x_b+1[16:32]]; an odd last block stays in natural order."""
    m_rows, k = xq.shape
    out = np.empty_like(xq)
    for i in range(m_rows):
        for p in range(k // (2 * BLOCK)):
            o = 2 * BLOCK * p
            for j in range(16):
                out[i, o + j] = xq[i, o + j]
                out[i, o + 16 + j] = xq[i, o + BLOCK + j]
                out[i, o + BLOCK + j] = xq[i, o + 16 + j]
                out[i, o + BLOCK + 16 + j] = xq[i, o + BLOCK + 16 + j]
        for j in range(2 * BLOCK * (k // (2 * BLOCK)), k):
            out[i, j] = xq[i, j]
    return out


@njit(parallel=True, nogil=True, cache=True)
def _matvec(packed, d, zero, has_min, x, out):
    """zero: Q4_1's minimums (has_min) or unused (Q4_0: the zero point is 8 steps of d)."""
    m_rows, k = x.shape
    nb = k // BLOCK
    xq = np.empty((m_rows, k), np.int8)
    xd = np.empty((m_rows, nb), np.float32)
    quantize_rows(x, xq, xd)
    xs = np.empty((m_rows, nb), np.float32)
    _block_sums(xq, xd, xs)
    xp = _pair_order(xq)
    # Q4_1 w = u d + m: the block adds m * sum(x); Q4_0 w = (u - 8) d: it adds d * (-8 sum(x))
    z = zero if has_min else d
    if not has_min:
        xs *= np.float32(-8.0)
    half = k // 2
    # one weight row a task, in memory order: one sequential stream (as in q8_0's _matvec; 8 rows a
    # task measured 135 vs 150 tok/s on SmolLM2 Q4_1 at 1 thread)
    for r in prange(packed.shape[0]):
        for i in range(m_rows):
            out[i, r] = _q4_one(packed, r * half, d, r * nb, z, xp, i * k, xd, i * nb, xs, nb)[0]


@njit(nogil=True, cache=True, inline="always")
def _dequant_row(packed, d, mins, has_min, r, out_row):
    """out_row (K,) = row r of the 4-bit matrix in float32 (low nibbles then high, per block)."""
    for b in range(d.shape[1]):
        for j in range(16):
            byte = packed[r, b * 16 + j]
            lo, hi = np.float32(byte & 15), np.float32(byte >> 4)
            if has_min:
                out_row[b * BLOCK + j] = lo * d[r, b] + mins[r, b]
                out_row[b * BLOCK + 16 + j] = hi * d[r, b] + mins[r, b]
            else:
                out_row[b * BLOCK + j] = (lo - np.float32(8)) * d[r, b]
                out_row[b * BLOCK + 16 + j] = (hi - np.float32(8)) * d[r, b]


@njit(parallel=True, nogil=True, cache=True)
def _dequant_rows(packed, d, mins, has_min, r0, r1, out):
    for i in prange(r1 - r0):
        _dequant_row(packed, d, mins, has_min, r0 + i, out[i])


_NO_MIN = np.zeros((1, 1), np.float32)


def q4_matmul(packed, d, m, x, out, integer=None):
    """out (M, N) = x (M, K) @ dequant(packed, d, m).T: the integer path when `integer`, tiled BLAS
    when not, None: integer for up to MATVEC_MAX_ROWS rows (as q8_0_matmul)."""
    n, half = packed.shape
    rows, k = x.shape
    if k != 2 * half or out.shape != (rows, n) or d.shape != (n, k // BLOCK):
        raise ValueError(f"q4_matmul: x {x.shape}, weight {packed.shape} (packed), scales {d.shape}, "
                         f"out {out.shape} do not fit")
    mins = _NO_MIN if m is None else m
    if integer is None:
        integer = rows <= MATVEC_MAX_ROWS
    if integer:
        for name, a in (("packed", packed), ("d", d), ("m", mins)):
            if not a.flags.c_contiguous:   # the integer dot reads flat offsets
                raise ValueError(f"q4_matmul: {name} must be C-contiguous")
        _matvec(packed, d, mins, m is not None, np.ascontiguousarray(x, dtype=np.float32), out)
        return out
    tile = np.empty((min(TILE_ROWS, n), k), np.float32)
    for r0 in range(0, n, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, n)
        _dequant_rows(packed, d, mins, m is not None, r0, r1, tile[:r1 - r0])
        np.matmul(x, tile[:r1 - r0].T, out=out[:, r0:r1])
    return out


@njit(nogil=True, cache=True)
def _gather_rows(packed, d, mins, has_min, ids, out):
    for i in range(ids.shape[0]):
        _dequant_row(packed, d, mins, has_min, ids[i], out[i])
    return out


def q4_gather_rows(packed, d, m, ids, out):
    """out (M, K) = dequantized rows ids of a 4-bit matrix (m: Q4_1's minimums, None for Q4_0): the
    embedding lookup of a 4-bit table."""
    return _gather_rows(packed, d, _NO_MIN if m is None else m, m is not None, np.asarray(ids, np.int64), out)
