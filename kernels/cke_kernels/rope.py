"""Rotary position embedding, Hugging Face rotate-half convention, fused with the
head split of the QKV projection.

For a head vector x of size D (h = D/2), position t and angle a_i = t * inv_freq_i:
    out[i]   = x[i] * cos(a_i) - x[i+h] * sin(a_i)
    out[i+h] = x[i+h] * cos(a_i) + x[i] * sin(a_i)
Backward is the rotation by -a. Angles are formed in float32 exactly as
transformers does (inv_freq = 1 / theta ** (arange(0, D, 2) / D), t * inv_freq),
so our tables and HF's agree bit for bit on the angle.

Rules: qkv rows are (B*T) tokens with columns [q heads | k heads | v heads]; the
per-head buffers are (B, heads, T, D) so attention GEMMs see contiguous
(T, D) blocks; query head g*G..(g+1)*G-1 share key/value head g (GQA). The
cos/sin tables have a row per position (T, D/2), shared by every sequence, or a
row per token (B*T, D/2) when positions differ between rows (packed sequences,
positions restarting at each document): token bt reads row bt % rows.
Tests: tests/unit/test_kernels.py::test_rope.
"""
import numpy as np
from numba import njit, prange


def rope_inv_freq(head_dim, theta, llama3=None):
    """Inverse frequencies (head_dim // 2,) float32; `llama3` = Llama 3.x rope scaling parameters
    {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings} or None.

    Llama 3 scaling keeps the high frequencies, divides the low ones by `factor` and blends in
    between, in float32 as transformers does (so the angles agree with HF's)."""
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)
    if llama3 is None:
        return inv
    factor = np.float32(llama3["factor"])
    low, high = llama3["low_freq_factor"], llama3["high_freq_factor"]
    old_ctx = llama3["original_max_position_embeddings"]
    wavelen = np.float32(2 * np.pi) / inv
    scaled = np.where(wavelen > np.float32(old_ctx / low), inv / factor, inv).astype(np.float32)
    smooth = ((np.float32(old_ctx) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    blended = ((np.float32(1) - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < np.float32(old_ctx / high)) & ~(wavelen > np.float32(old_ctx / low))
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_tables(head_dim, theta, positions, llama3=None):
    """positions (T,) ints -> cos, sin of shape (T, head_dim // 2), float32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return rope_cos_sin(positions, rope_inv_freq(head_dim, theta, llama3))


def rope_cos_sin(positions, inv_freq):
    """positions (T,) ints, inv_freq (D/2,) -> cos, sin (T, D/2) float32: the float32 angle, its
    cosine and sine in float64 rounded once (training and decode share these tables)."""
    ang = np.asarray(positions).astype(np.float32)[:, None] * inv_freq[None, :]
    ang64 = ang.astype(np.float64)
    return np.cos(ang64).astype(np.float32), np.sin(ang64).astype(np.float32)


@njit(cache=True, nogil=True, parallel=True)
def qkv_rope_forward(qkv, cos, sin, n_head, n_kv, q, k, v):
    """qkv (B*T, (n_head + 2 n_kv) * D) -> q (B, n_head, T, D), k, v (B, n_kv, T, D); RoPE on q, k.
    cos, sin: (T, D/2) or (B*T, D/2)."""
    B, _, T, D = q.shape
    h2 = D // 2
    nh = n_head + 2 * n_kv
    rows = cos.shape[0]
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        ct = bt % rows
        for hh in range(nh):
            base = hh * D
            if hh < n_head + n_kv:
                if hh < n_head:
                    dst = q[b, hh, t]
                else:
                    dst = k[b, hh - n_head, t]
                for i in range(h2):
                    c = cos[ct, i]
                    s = sin[ct, i]
                    x1 = qkv[bt, base + i]
                    x2 = qkv[bt, base + h2 + i]
                    dst[i] = x1 * c - x2 * s
                    dst[h2 + i] = x2 * c + x1 * s
            else:
                dst = v[b, hh - n_head - n_kv, t]
                for i in range(D):
                    dst[i] = qkv[bt, base + i]


@njit(cache=True, nogil=True, parallel=True)
def qkv_rope_backward(dq, dk, dv, cos, sin, dqkv):
    """Inverse of qkv_rope_forward for gradients: writes dqkv (B*T, (n_head + 2 n_kv) * D)."""
    B, n_head, T, D = dq.shape
    n_kv = dk.shape[1]
    h2 = D // 2
    nh = n_head + 2 * n_kv
    rows = cos.shape[0]
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        ct = bt % rows
        for hh in range(nh):
            base = hh * D
            if hh < n_head + n_kv:
                if hh < n_head:
                    src = dq[b, hh, t]
                else:
                    src = dk[b, hh - n_head, t]
                for i in range(h2):
                    c = cos[ct, i]
                    s = sin[ct, i]
                    g1 = src[i]
                    g2 = src[h2 + i]
                    dqkv[bt, base + i] = g1 * c + g2 * s
                    dqkv[bt, base + h2 + i] = g2 * c - g1 * s
            else:
                src = dv[b, hh - n_head - n_kv, t]
                for i in range(D):
                    dqkv[bt, base + i] = src[i]
