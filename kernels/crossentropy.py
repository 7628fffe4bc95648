"""Fused softmax + cross-entropy, mean over the targets that are not ignore_index.

Rules: exp in float32 (cke_kernels.expf), row sums in float32, log and loss in
float64; the loss is the float64 sum of per-row losses (in row order,
deterministic) over the count of valid targets. The fused
backward overwrites the logits with dlogits = grad_scale * (softmax - onehot) / n_valid
(rows with an ignored target get 0), so no second (N, V) buffer is needed.
With no valid target the loss is 0.0 and the gradient 0: a fully padded
micro-batch adds nothing (torch would return nan).
Tests: tests/test_kernels.py::test_crossentropy.
"""
import numpy as np
from numba import njit, prange

from .expf import FAST, expf, rowmax


@njit(cache=True, nogil=True)
def _count_valid(targets, ignore_index):
    n = 0
    for i in range(targets.shape[0]):
        if targets[i] != ignore_index:
            n += 1
    return n


@njit(cache=True, nogil=True, inline="always", fastmath=FAST)
def _row_lse(row):
    """log(sum(exp(row))) in float64 from float32 terms; returns (lse, max)."""
    m = rowmax(row, row.shape[0])
    s = np.float32(0.0)
    for j in range(row.shape[0]):
        s += expf(row[j] - m)
    return np.log(np.float64(s)) + m, m


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def _row_losses(logits, targets, ignore_index, losses):
    N, V = logits.shape
    for i in prange(N):
        t = targets[i]
        if t == ignore_index:
            losses[i] = 0.0
            continue
        lse, _ = _row_lse(logits[i])
        losses[i] = lse - logits[i, t]


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def _fused(logits, targets, ignore_index, dscale, losses):
    N, V = logits.shape
    ds = np.float32(dscale)
    for i in prange(N):
        t = targets[i]
        row = logits[i]
        if t == ignore_index:
            losses[i] = 0.0
            for j in range(V):
                row[j] = 0.0
            continue
        m = rowmax(row, V)
        target_logit = row[t]
        s = np.float32(0.0)
        for j in range(V):
            e = expf(row[j] - m)
            row[j] = e
            s += e
        losses[i] = np.log(np.float64(s)) + m - target_logit
        k = ds / s
        for j in range(V):
            row[j] *= k
        row[t] -= ds


def _check(logits, targets, ignore_index):
    N, V = logits.shape
    if targets.shape != (N,):
        raise ValueError(f"targets must have shape ({N},), got {targets.shape}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        raise ValueError(f"target id {int(targets[bad][0])} is outside the vocabulary [0, {V}) "
                         f"(and is not ignore_index={ignore_index})")


def crossentropy_forward(logits, targets, ignore_index=-100):
    """logits (N, V) float32, targets (N,) int64 -> mean loss (float)."""
    _check(logits, targets, ignore_index)
    n = _count_valid(targets, ignore_index)
    losses = np.empty(logits.shape[0], dtype=np.float64)
    _row_losses(logits, targets, ignore_index, losses)
    return float(losses.sum() / n) if n else 0.0


def crossentropy_fused_backward(logits, targets, ignore_index=-100, grad_scale=1.0):
    """Mean loss (float); overwrites logits (N, V) with grad_scale * dloss/dlogits."""
    _check(logits, targets, ignore_index)
    n = _count_valid(targets, ignore_index)
    losses = np.empty(logits.shape[0], dtype=np.float64)
    _fused(logits, targets, ignore_index, float(grad_scale) / max(n, 1), losses)
    return float(losses.sum() / n) if n else 0.0
