"""Single-node fused kernels: pure functions on numpy arrays (no MPI, no models).

Rules every module keeps: float32 compute; GEMMs through numpy's BLAS with out=,
everything else in numba (`cache=True, nogil=True`, `prange` over rows/blocks);
forward/backward pairs side by side, llm.c style, writing into caller-owned
buffers; each backward says whether it writes or ADDS. Tests: tests/test_kernels.py.

    embedding     token embedding
    rmsnorm       RMSNorm
    linear        x @ w.T + b (BLAS)
    rope          RoPE (HF rotate-half) fused with the QKV head split
    attention     causal GQA attention (batched BLAS + numba softmax)
    swiglu        silu(gate) * up
    residual      residual add
    crossentropy  fused softmax + cross-entropy with ignore_index
    optim         AdamW / SGD updates, grad sum of squares, scaling
    expf          a float32 exp numba can vectorize
    threads       one thread setting for BLAS and numba
    q8_0, decode_attention   inference kernels (see their docstrings)
"""
