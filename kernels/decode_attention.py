"""Attention over a preallocated KV cache, and RoPE at arbitrary positions (inference only).

One kernel serves prefill and decode: every query row m carries the cache row
(sequence) `seq[m]` it belongs to and its position `pos[m]`, and attends to keys
0..pos[m] of that sequence. Prefill of T prompt tokens is T rows with positions
start..start+T-1 (causal by construction); a decode step of B sequences is B
rows, each at its own length. GQA: query head h reads KV head h // (H // KVH).

Rules:
- caches are (B, KVH, T_max, D) float32, keys of one head contiguous in time;
  the caller writes this step's k/v into the cache before calling.
- softmax in float32 with the max subtracted, as the training kernels do.
- RoPE is Hugging Face's rotate-half convention: pairs (i, i + D/2), angles
  pos * inv_freq formed in float32 from cke_kernels.rope.rope_inv_freq, as in training.
- parallel over (row, head); each output written by one thread: deterministic.
- no allocation in the hot path except one score row per (row, head).
Tests: tests/test_generate.py (cached decode == full recompute == transformers).
"""
import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True, fastmath=False)
def cached_attention(q, k_cache, v_cache, seq, pos, out):
    """q (M, H, D), caches (B, KVH, T_max, D), seq/pos (M,) int64 -> out (M, H, D)."""
    m_rows, n_heads, d = q.shape
    n_kv = k_cache.shape[1]
    group = n_heads // n_kv
    scale = np.float32(1.0 / math.sqrt(d))
    for idx in prange(m_rows * n_heads):
        m = idx // n_heads
        h = idx % n_heads
        b = seq[m]
        kvh = h // group
        n_keys = pos[m] + 1
        qv = q[m, h]
        kc = k_cache[b, kvh]
        vc = v_cache[b, kvh]
        scores = np.empty(n_keys, np.float32)
        mx = np.float32(-np.inf)
        for t in range(n_keys):
            s = np.float32(0.0)
            for i in range(d):
                s += qv[i] * kc[t, i]
            s *= scale
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


@njit(parallel=True, nogil=True, cache=True)
def rope_positions(x, pos, inv_freq):
    """In place: x (M, H, D) rotated row m by position pos[m] (rotate-half pairs i, i + D/2)."""
    m_rows, n_heads, d = x.shape
    half = d // 2
    for m in prange(m_rows):
        p = np.float32(pos[m])
        for i in range(half):
            # float32 angle, as transformers computes pos * inv_freq in float32
            ang = p * inv_freq[i]
            c = np.float32(math.cos(ang))
            s = np.float32(math.sin(ang))
            for h in range(n_heads):
                a = x[m, h, i]
                b = x[m, h, i + half]
                x[m, h, i] = a * c - b * s
                x[m, h, i + half] = b * c + a * s
    return x
