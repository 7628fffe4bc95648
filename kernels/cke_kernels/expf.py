"""A float32 exp that numba can vectorize (numba has no SVML here, so np.exp in a loop is a
scalar libm call per element, and exp dominated softmax, SwiGLU and cross-entropy).

Cephes' expf: x = n ln2 + r, a degree-6 polynomial for e^r, 2^n put into the exponent
bits; about 2 ulp on [-87, 88]; inputs below -87.3 (and -inf) give ~1.2e-38, not 0 (so
callers mask instead of relying on exp(-inf)); above ~88.4 the result is inf, as exp's is.
NaN is not expected. Tests: tests/unit/test_kernels.py::test_expf.
FAST is the fastmath flag set for loops that call it: reassociation and contraction only,
so -inf and NaN keep their meaning.
`rowmax` is the max pass of every softmax here (attention, cross-entropy).
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


@intrinsic
def _bits_to_f32(typingctx, x):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return sig, codegen


@njit(cache=True, nogil=True, inline="always", fastmath=FAST)
def expf(x):
    x = np.float32(x)
    x = min(max(x, np.float32(-87.33654)), np.float32(88.72283))
    fx = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - fx * np.float32(0.693359375) - fx * np.float32(-2.12194440e-4)
    z = r * r
    y = (((((np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)) * r
            + np.float32(8.3334519073e-3)) * r + np.float32(4.1665795894e-2)) * r
          + np.float32(1.6666665459e-1)) * r + np.float32(5.0000001201e-1)) * z + r + np.float32(1.0)
    n = np.int32(fx)
    return y * _bits_to_f32((n + np.int32(127)) << np.int32(23))


@njit(cache=True, nogil=True, inline="always")
def rowmax(row, n):
    """max(row[:n]), n >= 1, exact. Eight independent running maxima: a single chain is one
    4-cycle compare per element (LLVM will not reorder an FP max without nnan, which FAST
    leaves out), eight overlap. NaN entries are skipped, as Python's max(m, x) skips them."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    n8 = n // 8 * 8
    for j in range(0, n8, 8):
        x = row[j]
        m0 = x if x > m0 else m0
        x = row[j + 1]
        m1 = x if x > m1 else m1
        x = row[j + 2]
        m2 = x if x > m2 else m2
        x = row[j + 3]
        m3 = x if x > m3 else m3
        x = row[j + 4]
        m4 = x if x > m4 else m4
        x = row[j + 5]
        m5 = x if x > m5 else m5
        x = row[j + 6]
        m6 = x if x > m6 else m6
        x = row[j + 7]
        m7 = x if x > m7 else m7
    for j in range(n8, n):
        x = row[j]
        m0 = x if x > m0 else m0
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0
