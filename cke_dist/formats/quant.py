"""The quantized weight type: GGML's Q8_0 and Q4_0 / Q4_1 blocks of 32 along a row, with the
kernels that multiply and gather them (cke_kernels.q8_0, cke_kernels.q4). GGUF files and our
quantized directories (formats/gguf.py, formats/quantized.py) read into it; the inference model's
linears (cke_dist.model.inference.Linear) compute with it.
Tests: tests/unit/test_q8_0.py, tests/unit/test_q4.py.
"""
from __future__ import annotations

import numpy as np

from cke_kernels.q4 import dequantize_q4, q4_gather_rows, q4_matmul, quantize_q4
from cke_kernels.q8_0 import dequantize_q8_0, q8_0_gather_rows, q8_0_matmul, quantize_q8_0


class Quant:
    """A quantized 2-D weight (N, K): Q8_0 (q int8 (N, K), d float32 (N, K/32)) or Q4_0 / Q4_1
    (q uint8 (N, K/2) packed, d, and Q4_1's m float32 (N, K/32)): see cke_kernels.q8_0 and .q4."""
    KINDS = ("q8_0", "q4_0", "q4_1")

    def __init__(self, kind, q, d, m=None):
        if kind not in self.KINDS:
            raise ValueError(f"quantization {kind!r}: one of {', '.join(self.KINDS)}")
        self.kind, self.q, self.d, self.m = kind, q, d, m

    @classmethod
    def of(cls, w: np.ndarray, kind: str) -> "Quant":
        if kind == "q8_0":
            return cls(kind, *quantize_q8_0(w))
        return cls(kind, *quantize_q4(w, kind))

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.q.shape
        return (n, k) if self.kind == "q8_0" else (n, 2 * k)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes + (0 if self.m is None else self.m.nbytes)

    @staticmethod
    def stack(parts: list["Quant"]) -> "Quant":
        """Rows of several weights of one kind as one (q/k/v, gate/up: one product each)."""
        if len(parts) == 1:
            return parts[0]
        cat = lambda xs: np.ascontiguousarray(np.concatenate(xs))     # noqa: E731
        m = None if parts[0].m is None else cat([p.m for p in parts])
        return Quant(parts[0].kind, cat([p.q for p in parts]), cat([p.d for p in parts]), m)

    def dequantized(self) -> np.ndarray:
        if self.kind == "q8_0":
            return dequantize_q8_0(self.q, self.d)
        return dequantize_q4(self.q, self.d, self.m)

    def matmul(self, x, out, integer=None):
        """out = x @ W.T; integer: the integer path (True), BLAS (False), or by row count (None)."""
        if self.kind == "q8_0":
            return q8_0_matmul(self.q, self.d, x, out, integer=integer)
        return q4_matmul(self.q, self.d, self.m, x, out, integer=integer)

    def gather_rows(self, ids, out):
        if self.kind == "q8_0":
            return q8_0_gather_rows(self.q, self.d, ids, out)
        return q4_gather_rows(self.q, self.d, self.m, ids, out)
