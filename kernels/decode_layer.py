"""A decoder layer's decode step as compiled calls, with no Python between its ops.

Why: on a small model a token is ~12 ops a layer (norm, QKV GEMV, RoPE, cache write, attention,
o GEMV, residual, norm, gate/up GEMV, SwiGLU, down GEMV, residual), each a few to tens of
microseconds of work. Called one by one from Python each paid its dispatch, view slicing and
argument checks: about a millisecond a token on SmolLM2-135M (30 layers), ~10% of it. Here the
same kernels (rmsnorm_forward, rope_rows, cached_attention, swiglu_forward, residual_forward and
the GEMVs of decode_matvec / q8_0 / q4) are called from compiled code in the same order, so a
layer computes exactly what the op-by-op path computes.

Rules:
- the row-parallel sums of tensor parallelism are the only exits to Python: `attention_block`
  ends with o_proj's partial product, the caller allreduces it, `mlp_block` ends with
  down_proj's, the caller allreduces it and adds the residual (`decode_layer` runs both halves
  and the residual in one call when there is no tensor parallelism).
- a linear is (w, d, m): float32 (w the weight; d, m empty), Q8_0 (w int8, d its block scales)
  or Q4_0 / Q4_1 (w uint8 packed nibbles, d, and Q4_1's minimums m, empty for Q4_0); `gemv`
  picks the kernel from w's dtype when numba compiles the caller, so the linears of one layer
  may differ (a GGUF file mixes formats).
- a bias of size 0 means none; shapes and layouts are the caller's to check (InferenceModel does,
  once, when it builds its layers).
Tests: tests/test_generate.py, tests/test_q8_0.py, tests/test_q4.py (decode == prefill ==
transformers, through cke_dist.model.decode).
"""
from numba import njit, types
from numba.extending import overload

from .decode_attention import cached_attention, rope_rows
from .decode_matvec import f32_matvec
from .q4 import _matvec as q4_matvec
from .q8_0 import _matvec as q8_0_matvec
from .residual import residual_forward
from .rmsnorm import rmsnorm_forward
from .swiglu import swiglu_forward


def gemv(w, d, m, x, out):
    """out (M, N) = x (M, K) @ W.T for the linear (w, d, m); compiled callers only."""
    raise NotImplementedError("gemv is resolved when numba compiles its caller")


@overload(gemv, jit_options={"nogil": True})
def _gemv(w, d, m, x, out):
    if not isinstance(w, types.Array):
        return None
    if w.dtype == types.float32:
        def f32(w, d, m, x, out):
            f32_matvec(w, x, out)
        return f32
    if w.dtype == types.int8:
        def q8(w, d, m, x, out):
            q8_0_matvec(w, d, x, out)
        return q8
    if w.dtype == types.uint8:
        def q4(w, d, m, x, out):
            q4_matvec(w, d, m, m.size > 0, x, out)
        return q4
    return None


@njit(nogil=True, cache=True)
def _add_bias(y, bias):
    if bias.size:
        for i in range(y.shape[0]):
            for j in range(y.shape[1]):
                y[i, j] += bias[j]


@njit(nogil=True, cache=True)
def attention_block(x, ln1, eps, wqkv, dqkv, mqkv, bqkv, wo, do, mo,
                    cos, sin, seq, pos, k_cache, v_cache, layer, kv_head,
                    xn, rstd, qkv, q, k, v, att, out):
    """out (M, C) = o_proj(attention(rope(qkv(rmsnorm(x))))) for this rank's heads (a partial
    sum under tensor parallelism); writes the rows' keys and values into cache `layer`."""
    n_rows = x.shape[0]
    n_q, n_kv, hd = q.shape[1], k.shape[1], q.shape[2]
    rmsnorm_forward(x, ln1, eps, xn, rstd)
    gemv(wqkv, dqkv, mqkv, xn, qkv)
    _add_bias(qkv, bqkv)
    for r in range(n_rows):
        for h in range(n_q):
            for i in range(hd):
                q[r, h, i] = qkv[r, h * hd + i]
        for h in range(n_kv):
            for i in range(hd):
                k[r, h, i] = qkv[r, (n_q + h) * hd + i]
                v[r, h, i] = qkv[r, (n_q + n_kv + h) * hd + i]
    rope_rows(q, cos, sin)
    rope_rows(k, cos, sin)
    kc, vc = k_cache[layer], v_cache[layer]
    for r in range(n_rows):
        kc[seq[r], :, pos[r], :] = k[r]
        vc[seq[r], :, pos[r], :] = v[r]
    cached_attention(q, kc, vc, seq, pos, kv_head, att)
    gemv(wo, do, mo, att.reshape(n_rows, n_q * hd), out)


@njit(nogil=True, cache=True)
def mlp_block(x, attn_out, o_bias, ln2, eps, wgu, dgu, mgu, wd, dd, md,
              x2, xn, rstd, gu, h, out):
    """x2 = x + attn_out (+ o_proj's bias, added once after the tp sum); out (M, C) =
    down(swiglu(gate_up(rmsnorm(x2)))): a partial sum under tensor parallelism."""
    _add_bias(attn_out, o_bias)
    residual_forward(x, attn_out, x2)
    rmsnorm_forward(x2, ln2, eps, xn, rstd)
    gemv(wgu, dgu, mgu, xn, gu)
    swiglu_forward(gu, h)
    gemv(wd, dd, md, h, out)


@njit(nogil=True, cache=True)
def decode_layer(x, ln1, eps, wqkv, dqkv, mqkv, bqkv, wo, do, mo, o_bias, ln2, wgu, dgu, mgu, wd, dd, md,
                 cos, sin, seq, pos, k_cache, v_cache, layer, kv_head,
                 x2, xn, rstd, qkv, q, k, v, att, tmp, gu, h):
    """x (M, C) in place: one whole layer (attention_block, mlp_block, the residual) in one call."""
    attention_block(x, ln1, eps, wqkv, dqkv, mqkv, bqkv, wo, do, mo, cos, sin, seq, pos,
                    k_cache, v_cache, layer, kv_head, xn, rstd, qkv, q, k, v, att, tmp)
    mlp_block(x, tmp, o_bias, ln2, eps, wgu, dgu, mgu, wd, dd, md, x2, xn, rstd, gu, h, tmp)
    residual_forward(x2, tmp, x)
