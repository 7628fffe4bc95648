"""Q8_0 weight-only quantization (GGML's Q8_0) and the products that read it.

Format: a (N, K) float32 weight, K a multiple of 32, becomes
  qs     (N, K)      int8     the values, q = round(w / d) in [-127, 127]
  scales (N, K//32)  float32  one d per block of 32 along K: d = fp16(max|w| / 127)
so w ~= qs * d blockwise. d is rounded to float16 (what GGML stores) *before*
the values are quantized against it, so every element keeps |w - q*d| <= d/2.
On disk the scales are float16 (cke_dist/model/inference.py save_q8_dir, written by
`cke-dist quantize`); in memory float32, so
the kernel needs no half-precision arithmetic.

Rules:
- q8_0_matvec reads the int8 blocks directly: no dequantized copy of the
  weight, ever. It serves the decode step (a few rows of activations at once,
  each weight row read once from memory for all of them). As in llama.cpp, it
  first quantizes the activations to Q8_0 blocks (float32 scales), then per
  block takes an exact int8 x int8 -> int32 dot and scales it once by both
  block scales: the activation rounding (at most half a step per value) is the
  only error beyond the weight's, bounded in tests/unit/test_q8_0.py. Integer math
  because converting every int8 weight to float was the bottleneck (compute-bound
  at ~6 G weights/s/core; now ~2x faster, near the memory roofline).
- the block dot is LLVM IR emitted by a numba intrinsic (make_q8_dot): x86
  VNNI vpdpbusd where the CPU has AVX512-VNNI (weights biased by 128 to unsigned,
  the block's -128 * sum(x) subtracted exactly: ~half the instructions of the
  pmaddwd path), pmaddwd where it has AVX-512BW or AVX2, plain vector IR elsewhere.
  Integer sums are exact; variants that sum them into the same lanes (GROUPING)
  give the same bits, and the host uses one variant, so results do not depend on
  the thread count or the run.
- q8_0_matmul serves prefill: it dequantizes a tile of rows into a small
  scratch buffer and hands the GEMM to BLAS (no hand-written GEMM), with float
  activations (so prompts of more than MATVEC_MAX_ROWS tokens see no activation
  rounding). The caller may pick the path (`integer`): the serving engine picks
  it per sequence, so a row's numbers do not depend on the rows batched with it.
- no allocation in the hot path beyond the tile scratch and the quantized
  activations (M x K int8); deterministic: each output is summed by one thread in
  a fixed order, whatever the thread count.
Tests: tests/unit/test_q8_0.py.
"""
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import config, njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

from . import serialize_cache_writes

serialize_cache_writes()

BLOCK = 32
# up to this many activation rows the integer path is faster than dequantizing a tile for BLAS
# (measured on a 3072 x 576 weight at 1 thread: Q4_1 863 vs 1204 us at 16 rows, even at 32)
MATVEC_MAX_ROWS = 24
# bytes ahead in the weight stream that the products prefetch (rows are adjacent, so near a row's
# end this reaches into the next rows; measured on SmolLM2 and the Llama-3.2-1B shape at 1 thread:
# 512 -> 4096 bytes +4-18%, 8192 no better)
PREFETCH = 4096
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


def _simd():
    """The widest integer multiply-add our codegen may name for the CPU numba compiles for."""
    if config.CPU_NAME:                  # NUMBA_CPU_NAME set (e.g. portable caches): assume nothing
        return "generic"
    feats = llvm.get_host_cpu_features()
    if feats.get("avx512vnni") and feats.get("avx512vl"):
        return "vnni"
    return "avx512bw" if feats.get("avx512bw") else "avx2" if feats.get("avx2") else "generic"


# the lanes a variant sums each block's 32 products into: pairs (j = 2l, 2l+1, 2l+16, 2l+17: what
# pmaddwd on the two sign-extended halves gives) or quads (j = 4l..4l+3: what vpdpbusd gives).
# Variants with the same grouping give the same bits; "generic4" is the plain-IR quad variant.
GROUPING = {"generic": "pairs", "avx2": "pairs", "avx512bw": "pairs", "generic4": "quads", "vnni": "quads"}


def _vnni_bias(builder, x):
    """Per activation block, once for all rows: lane l = -128 * (x[4l] + .. + x[4l+3])."""
    v8 = ir.VectorType(_I32, 8)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8, v8, v8]),
                                        "llvm.x86.avx512.vpdpbusd.256")
    sums = builder.call(fn, [ir.Constant(v8, [0] * 8), ir.Constant(v8, [0x80808080] * 8), builder.bitcast(x, v8)])
    return builder.sub(ir.Constant(v8, [0] * 8), sums)


def _vnni_dot(builder, q, x, bias):
    """<32 x i8> q, x -> <8 x i32> (quads), exact: VNNI multiplies unsigned by signed bytes, so q is
    biased to q + 128 (a xor of the sign bit) and the block's -128 * sum(x) starts the accumulator."""
    v8, b32 = ir.VectorType(_I32, 8), ir.VectorType(ir.IntType(8), BLOCK)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8, v8, v8]),
                                        "llvm.x86.avx512.vpdpbusd.256")
    u = builder.xor(q, ir.Constant(b32, [-128] * BLOCK))
    return builder.call(fn, [bias, builder.bitcast(u, v8), builder.bitcast(x, v8)])


def _block_pair_sums(builder, q, x, simd):
    """<32 x i8> q, x -> <8 x i32>, lane l = sum of q[j]*x[j] over j in {2l, 2l+1, 2l+16, 2l+17},
    exact in int32 (at most 4 * 127^2); "generic4" groups j = 4l..4l+3 instead (VNNI's lanes).
    x86 pmaddwd (int16 pairs -> int32) where the CPU has it: LLVM does not form it from the generic
    IR in this shape (it narrows the multiply to int16 and widens again, 2x slower)."""
    v16, v8 = ir.VectorType(_I32, 16), ir.VectorType(_I32, 8)
    if simd in ("generic", "generic4"):
        w = ir.VectorType(_I32, 32)
        p = builder.mul(builder.sext(q, w), builder.sext(x, w), flags=["nsw"])
        if simd == "generic":
            parts = [builder.shuffle_vector(p, p, _lanes(2 * lane + o for lane in range(8))) for o in (0, 1, 16, 17)]
        else:
            parts = [builder.shuffle_vector(p, p, _lanes(4 * lane + o for lane in range(8))) for o in range(4)]
        return builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))
    w16 = ir.VectorType(ir.IntType(16), 32)
    qw, xw = builder.sext(q, w16), builder.sext(x, w16)
    if simd == "avx512bw":
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [w16, w16]),
                                            "llvm.x86.avx512.pmaddw.d.512")
        s = builder.call(fn, [qw, xw])
        return builder.add(builder.shuffle_vector(s, s, _lanes(range(8))),
                           builder.shuffle_vector(s, s, _lanes(range(8, 16))))
    h16 = ir.VectorType(ir.IntType(16), 16)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [h16, h16]), "llvm.x86.avx2.pmadd.wd")
    lo, hi = _lanes(range(16)), _lanes(range(16, 32))
    return builder.add(builder.call(fn, [builder.shuffle_vector(qw, qw, lo), builder.shuffle_vector(xw, xw, lo)]),
                       builder.call(fn, [builder.shuffle_vector(qw, qw, hi), builder.shuffle_vector(xw, xw, hi)]))


def _lanes(idx):
    idx = list(idx)
    return ir.Constant(ir.VectorType(_I32, len(idx)), idx)


def _scaled_add(builder, acc, ints, scale):
    """acc (an <8 x float> slot) += float(ints <8 x i32>) * scale (one float, broadcast): a block's
    exact integer dot scaled once by its two block scales."""
    vf = ir.VectorType(ir.FloatType(), 8)
    dv = builder.insert_element(ir.Constant(vf, ir.Undefined), scale, ir.Constant(_I32, 0))
    dv = builder.shuffle_vector(dv, dv, _lanes([0] * 8))
    f = builder.sitofp(ints, vf)
    builder.store(builder.fadd(builder.load(acc), builder.fmul(f, dv, flags=_CONTRACT), flags=_CONTRACT), acc)


def _block_pairs(builder, nb, block, before_pair=None):
    """block(b, which) for b < nb, two blocks an iteration into alternating accumulators (which =
    0, 1: two dependency chains hide the add latency), the odd last block into accumulator 0."""
    i64 = ir.IntType(64)
    pairs = builder.sdiv(nb, ir.Constant(i64, 2))
    with cgutils.for_range(builder, pairs) as loop:
        b0 = builder.mul(loop.index, ir.Constant(i64, 2))
        if before_pair is not None:
            before_pair(b0)
        block(b0, 0)
        block(builder.add(b0, ir.Constant(i64, 1)), 1)
    with builder.if_then(builder.icmp_signed("!=", builder.mul(pairs, ir.Constant(i64, 2)), nb)):
        block(builder.sub(nb, ir.Constant(i64, 1)), 0)


def _row_sums(builder, acc):
    """Each row's two accumulators added, then its 8 lanes in a fixed order: one float per row."""
    sums = []
    for a0, a1 in acc:
        v = builder.fadd(builder.load(a0), builder.load(a1))
        t = builder.extract_element(v, ir.Constant(_I32, 0))
        for i in range(1, 8):
            t = builder.fadd(t, builder.extract_element(v, ir.Constant(_I32, i)))
        sums.append(t)
    return sums


def make_q8_dot(simd, rows):
    """A numba intrinsic q8_dot(q, qo, sq, sqo, x, xo, sx, sxo, nb) -> tuple of `rows` float32:
    for r < rows, the sum over blocks b < nb of (int dot of q[qo + r*32*nb + 32b : +32] and
    x[xo+32b : +32]) * sq[sqo + r*nb + b] * sx[sxo+b]: `rows` consecutive rows of a Q8_0 weight
    against one quantized activation row; q, x int8, sq, sx float32, flat element offsets into
    C-contiguous arrays. Per block and row: one integer dot into 8 int32 lanes, converted once and
    scaled into 8 float lanes (2 accumulators per row, blocks alternating, for latency; the
    activation block is loaded once for all rows); lanes are summed in a fixed order at the end."""
    @intrinsic
    def q8_dot(typingctx, q, qo, sq, sqo, x, xo, sx, sxo, nb):
        for a, dt in ((q, types.int8), (sq, types.float32), (x, types.int8), (sx, types.float32)):
            if not (isinstance(a, types.Array) and a.layout == "C" and a.dtype == dt):
                raise errors.TypingError(f"q8_dot needs C-contiguous {dt} arrays, got {a}")
        ret = types.UniTuple(types.float32, rows)
        sig = ret(q, qo, sq, sqo, x, xo, sx, sxo, nb)

        def codegen(context, builder, signature, args):
            ptr = {i: context.make_array(signature.args[i])(context, builder, args[i]).data for i in (0, 2, 4, 6)}
            qo_, sqo_, xo_, sxo_, nb_ = (context.cast(builder, args[i], signature.args[i], types.int64)
                                         for i in (1, 3, 5, 7, 8))
            i64 = ir.IntType(64)
            const = lambda v: ir.Constant(i64, v)       # noqa: E731
            vf = ir.VectorType(ir.FloatType(), 8)
            v8 = ir.VectorType(ir.IntType(8), BLOCK).as_pointer()
            row_q = [builder.add(qo_, builder.mul(const(r * BLOCK), nb_)) for r in range(rows)]
            row_s = [builder.add(sqo_, builder.mul(const(r), nb_)) for r in range(rows)]
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * 8)) for _ in range(2)]
                   for _ in range(rows)]

            def block(b, which):
                off = builder.mul(b, const(BLOCK))
                lx = builder.load(builder.bitcast(builder.gep(ptr[4], [builder.add(xo_, off)]), v8), align=1)
                dx = builder.load(builder.gep(ptr[6], [builder.add(sxo_, b)]))
                bias = _vnni_bias(builder, lx) if simd == "vnni" else None
                for r in range(rows):
                    lq = builder.load(builder.bitcast(builder.gep(ptr[0], [builder.add(row_q[r], off)]), v8), align=1)
                    d = builder.fmul(builder.load(builder.gep(ptr[2], [builder.add(row_s[r], b)])), dx)
                    ints = _vnni_dot(builder, lq, lx, bias) if simd == "vnni" else _block_pair_sums(builder, lq, lx, simd)
                    _scaled_add(builder, acc[r][which], ints, d)

            pf = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                ir.VoidType(), [ir.PointerType(ir.IntType(8)), _I32, _I32, _I32]), "llvm.prefetch.p0")

            def prefetch(b0):
                # one cache line (a block pair) per row, PREFETCH bytes ahead: the hardware prefetcher
                # alone ramps up too slowly on rows of a few hundred bytes
                for r in range(rows):
                    at = builder.add(row_q[r], builder.add(builder.mul(b0, const(BLOCK)), const(PREFETCH)))
                    builder.call(pf, [builder.bitcast(builder.gep(ptr[0], [at]), ir.PointerType(ir.IntType(8))),
                                      ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
            _block_pairs(builder, nb_, block, prefetch)
            return context.make_tuple(builder, ret, _row_sums(builder, acc))
        return sig, codegen
    return q8_dot


_I32 = ir.IntType(32)
_CONTRACT = ("contract",)           # lets LLVM fuse the scale multiply and the add into one FMA
q8_dot1 = make_q8_dot(_simd(), 1)


@njit(nogil=True, cache=True)
def quantize_rows(x, xq, xd):
    """Activations (M, K) float32 -> xq int8 (M, K), xd float32 (M, K//32): Q8_0 blocks with float32
    scales (no float16 rounding: they never leave memory). A block holding inf/NaN gets a NaN scale,
    so the products it enters come out NaN as in float32 instead of silently finite."""
    m_rows, k = x.shape
    for m in range(m_rows):
        for b in range(k // BLOCK):
            amax = np.float32(0.0)
            poison = np.float32(0.0)
            for j in range(b * BLOCK, (b + 1) * BLOCK):
                amax = max(amax, abs(x[m, j]))
                poison += x[m, j] * np.float32(0.0)          # NaN iff the block has inf or NaN
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 and poison == 0 else np.float32(0.0)
            xd[m, b] = d if poison == 0 else np.float32(np.nan)
            for j in range(b * BLOCK, (b + 1) * BLOCK):
                xq[m, j] = np.int8(np.rint(x[m, j] * inv))


@njit(parallel=True, nogil=True, cache=True)
def _matvec(qs, scales, x, out):
    m_rows, k = x.shape
    nb = k // BLOCK
    # the activations are quantized once per call (serially: K values, ~1% of the GEMV's time)
    xq = np.empty((m_rows, k), np.int8)
    xd = np.empty((m_rows, nb), np.float32)
    quantize_rows(x, xq, xd)
    # one weight row a task, rows in memory order: the weights are one sequential stream, which the
    # prefetchers follow best (8 interleaved rows a task, each activation block loaded once for all
    # of them, measured 12.8 vs 15.9 tok/s on the Llama-3.2-1B shape at Q8_0, 1 thread)
    for r in prange(qs.shape[0]):
        for m in range(m_rows):
            out[m, r] = q8_dot1(qs, r * k, scales, r * nb, xq, m * k, xd, m * nb, nb)[0]


def q8_0_matvec(qs, scales, x, out):
    """out (M, N) ~= x (M, K) @ dequant(qs, scales).T for small M (decode), x quantized to Q8_0 blocks
    first (see _matvec). qs int8, the rest float32, all C-contiguous."""
    if x.shape[1] != qs.shape[1] or out.shape != (x.shape[0], qs.shape[0]):
        raise ValueError(f"q8_0_matvec: x {x.shape}, weight {qs.shape}, out {out.shape} do not fit")
    _check_layout(qs, scales, x)
    _matvec(qs, scales, x, out)
    return out


def _check_layout(qs, scales, x):
    # the integer dot reads flat offsets: a strided view would be read wrongly, not rejected by numba
    for name, a, dt in (("weight", qs, np.int8), ("scales", scales, np.float32), ("x", x, np.float32)):
        if a.dtype != dt or not a.flags.c_contiguous:
            raise ValueError(f"Q8_0 product: {name} must be C-contiguous {np.dtype(dt)}, got {a.dtype} "
                             f"{'C-contiguous' if a.flags.c_contiguous else 'strided'}; pass np.ascontiguousarray")
    if scales.shape != (qs.shape[0], qs.shape[1] // BLOCK):
        raise ValueError(f"Q8_0 product: scales {scales.shape} do not fit weight {qs.shape}")


def q8_0_matmul(qs, scales, x, out, scratch=None, integer=None):
    """out (M, N) = x (M, K) @ dequant(qs, scales).T, any M: the integer path (activations quantized
    per row) when `integer`, tiled BLAS (float activations) when not; None: integer for up to
    MATVEC_MAX_ROWS rows. Either path gives a row the same numbers whatever the other rows are."""
    m, k = x.shape
    n = qs.shape[0]
    if k != qs.shape[1] or out.shape != (m, n):
        raise ValueError(f"q8_0_matmul: x {x.shape}, weight {qs.shape}, out {out.shape} do not fit")
    if integer is None:
        integer = m <= MATVEC_MAX_ROWS
    if integer:
        _check_layout(qs, scales, x)
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
