"""Attention over a preallocated KV cache, and RoPE at arbitrary positions (inference only).

One kernel serves prefill and decode: every query row m carries the cache row
(sequence) `seq[m]` it belongs to and its position `pos[m]`, and attends to keys
0..pos[m] of that sequence. Prefill of T prompt tokens is T rows with positions
start..start+T-1 (causal by construction); a decode step of B sequences is B
rows, each at its own length. GQA: query head h reads KV head kv_head[h] (h // group
in one piece; a tensor-parallel rank whose heads cut GQA groups maps them as
cke_dist.model.layout's segments say).

Rules:
- caches are (B, KVH, T_max, D) float32, keys of one head contiguous in time;
  the caller writes this step's k/v into the cache before calling.
- softmax in float32 with the max subtracted, as the training kernels do.
- the q.k and p.v sums may be reassociated (so they vectorize: a q.k of 64 summed one term
  after another was a 64-long chain of dependent adds, most of a small model's attention
  time); the order is fixed at compile time, so results do not depend on the thread count.
- RoPE is Hugging Face's rotate-half convention: pairs (i, i + D/2), with the cos/sin
  tables of cke_kernels.rope.rope_cos_sin (the ones training uses), one row per query row.
- parallel over (row, head); each output written by one thread: deterministic.
- no allocation in the hot path except one score row per (row, head).
Tests: tests/integration/test_generate.py (cached decode == full recompute == transformers).
"""
import math

import numpy as np
from numba import njit, prange

_REASSOC = {"reassoc", "contract"}


@njit(nogil=True, cache=True, fastmath=_REASSOC, inline="always")
def _dot(a, b):
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@njit(parallel=True, nogil=True, cache=True, fastmath=_REASSOC)
def cached_attention(q, k_cache, v_cache, seq, pos, kv_head, out):
    """q (M, H, D), caches (B, KVH, T_max, D), seq/pos (M,) int64, kv_head (H,) int64 -> out (M, H, D)."""
    m_rows, n_heads, d = q.shape
    scale = np.float32(1.0 / math.sqrt(d))
    for idx in prange(m_rows * n_heads):
        m = idx // n_heads
        h = idx % n_heads
        b = seq[m]
        kvh = kv_head[h]
        n_keys = pos[m] + 1
        qv = q[m, h]
        kc = k_cache[b, kvh]
        vc = v_cache[b, kvh]
        scores = np.empty(n_keys, np.float32)
        mx = np.float32(-np.inf)
        for t in range(n_keys):
            s = _dot(qv, kc[t]) * scale
            scores[t] = s
            if s > mx:
                mx = s
        total = np.float32(0.0)
        for t in range(n_keys):
            e = np.float32(math.exp(scores[t] - mx))
            scores[t] = e
            total += e
        o = out[m, h]
        o[:] = 0.0
        inv = np.float32(1.0) / total
        for t in range(n_keys):
            w = scores[t] * inv
            for i in range(d):
                o[i] += w * vc[t, i]
    return out


@njit(nogil=True, cache=True)
def rope_rows(x, cos, sin):
    """In place: x (M, H, D) row m rotated by the angles of table row m (cos, sin (M, D/2)).
    Serial: a decode step's few rows are less work than opening a parallel region."""
    m_rows, n_heads, d = x.shape
    half = d // 2
    for m in range(m_rows):
        for h in range(n_heads):
            for i in range(half):
                c = cos[m, i]
                s = sin[m, i]
                a = x[m, h, i]
                b = x[m, h, i + half]
                x[m, h, i] = a * c - b * s
                x[m, h, i + half] = b * c + a * s
    return x
