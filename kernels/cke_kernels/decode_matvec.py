"""Float32 matrix-vector products for decode: out (M, N) = x (M, K) @ w (N, K).T for a few rows M.

Why not BLAS here: a decode step is ~10 small products per layer between numba kernels. OpenBLAS
keeps its own pthread pool and numba its OpenMP pool; at 2 threads on 2 cores the two pools take
turns spinning on the cores the other needs, and decode ran 10-60x slower than at 1 thread
(bench/decode.py, OMP_WAIT_POLICY ACTIVE vs PASSIVE). With the GEMVs in numba, a decode step uses
one pool. Prefill and training keep BLAS GEMMs (few, long calls; there BLAS wins).

Rules: each output is one thread's sequential float32 sum (deterministic for any thread count);
weight rows are read once per call for all M rows (M small: the rows stay in L1); no allocation.
Memory-bound; on one core it measured level with OpenBLAS sgemv from DRAM here (noisy shared machine).
Tests: tests/integration/test_generate.py (decode == full recompute == transformers), tests/unit/test_q8_0.py.
"""
import numpy as np
from numba import njit, prange

F32_MATVEC_MAX_ROWS = 8    # above this many rows a float32 product goes to BLAS (cke_dist.model.inference.Linear)


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def f32_matvec(w, x, out):
    """w (N, K), x (M, K), out (M, N), float32 C-contiguous."""
    n_rows, k = w.shape
    m_rows = x.shape[0]
    n4 = (n_rows + 3) // 4
    for t in prange(n4):
        # four weight rows per task: four memory streams in flight and each x element loaded once
        # for four rows (measured 15.4-15.8 GB/s from DRAM on one core, as OpenBLAS; one row: 13)
        n = 4 * t
        if n + 4 <= n_rows:
            w0 = w[n]
            w1 = w[n + 1]
            w2 = w[n + 2]
            w3 = w[n + 3]
            for m in range(m_rows):
                xm = x[m]
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for j in range(k):
                    xv = xm[j]
                    a0 += w0[j] * xv
                    a1 += w1[j] * xv
                    a2 += w2[j] * xv
                    a3 += w3[j] * xv
                out[m, n] = a0
                out[m, n + 1] = a1
                out[m, n + 2] = a2
                out[m, n + 3] = a3
        else:
            for r in range(n, n_rows):
                wr = w[r]
                for m in range(m_rows):
                    xm = x[m]
                    acc = np.float32(0.0)
                    for j in range(k):
                        acc += wr[j] * xm[j]
                    out[m, r] = acc
    return out
