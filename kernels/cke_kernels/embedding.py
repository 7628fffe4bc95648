"""Token embedding: out[i] = wte[tokens[i] - vocab_start], for a table holding vocab rows
[vocab_start, vocab_start + wte.shape[0]) (the whole vocabulary, or a tensor-parallel shard).

Rules: tokens are int64 of shape (N,) and already range-checked by the caller; a token outside
the table's rows gives a zero row (forward) and adds nothing (backward), so the shards' outputs
sum to the full lookup exactly. Backward ADDS into dwte (gradient accumulation) and runs
serially so that repeated tokens sum in a fixed order (deterministic).
Tests: tests/unit/test_kernels.py::test_embedding, tests/ranks/tensor_parallel_mpi.py.
"""
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True)
def embedding_forward(tokens, wte, out, vocab_start=0):
    """tokens (N,) int64, wte (V_local, C) float32 -> out (N, C)."""
    n, c = out.shape
    rows = wte.shape[0]
    for i in prange(n):
        t = tokens[i] - vocab_start
        if 0 <= t < rows:
            row = wte[t]
            for j in range(c):
                out[i, j] = row[j]
        else:
            for j in range(c):
                out[i, j] = 0.0


@njit(cache=True, nogil=True)
def embedding_backward(tokens, dout, dwte, vocab_start=0):
    """dwte[tokens[i] - vocab_start] += dout[i] for every i whose token is in this table, in order."""
    n, c = dout.shape
    rows = dwte.shape[0]
    for i in range(n):
        t = tokens[i] - vocab_start
        if 0 <= t < rows:
            for j in range(c):
                dwte[t, j] += dout[i, j]
