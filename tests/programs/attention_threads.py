"""Attention forward and backward over 5 sequences with N numba threads; saves every output to OUT
(tests/unit/test_kernels.py compares 3 threads with 1, bit for bit).

    python tests/programs/attention_threads.py N OUT.npz
"""
import sys

import numpy as np

from cke_kernels import attention
from cke_kernels.threads import set_num_threads

set_num_threads(int(sys.argv[1]))
rng = np.random.default_rng(7)
B, H, KV, T, D = 5, 4, 2, 70, 8
q, k, v, dout = (rng.standard_normal(s, dtype=np.float32) for s in
                 [(B, H, T, D), (B, KV, T, D), (B, KV, T, D), (B, H, T, D)])
lse = np.empty((B, H, T), np.float32)
out, dq, dk, dv = np.empty_like(q), np.empty_like(q), np.empty_like(k), np.empty_like(v)
attention.attention_forward(q, k, v, 0.3, out, lse)
attention.attention_backward(dout, q, k, v, out, lse, 0.3, dq, dk, dv)
np.savez(sys.argv[2], lse=lse, out=out, dq=dq, dk=dk, dv=dv)
