"""Token embedding: out[i] = wte[tokens[i]].

Rules: tokens are int64 of shape (N,) and already range-checked by the caller;
backward ADDS into dwte (gradient accumulation) and runs serially so that
repeated tokens sum in a fixed order (deterministic). Tests: tests/test_kernels.py.
"""
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True)
def embedding_forward(tokens, wte, out):
    """tokens (N,) int64, wte (V, C) float32 -> out (N, C)."""
    n, c = out.shape
    for i in prange(n):
        row = wte[tokens[i]]
        for j in range(c):
            out[i, j] = row[j]


@njit(cache=True, nogil=True)
def embedding_backward(tokens, dout, dwte):
    """dwte[tokens[i]] += dout[i] for every i, in order."""
    n, c = dout.shape
    for i in range(n):
        t = tokens[i]
        for j in range(c):
            dwte[t, j] += dout[i, j]
