"""Softmax + cross-entropy, mean over the targets that are not ignore_index, over logits that
may be one vocab shard of several (vocab-parallel, Megatron's way).

Three passes, each a kernel, with one reduction of an (N,) vector over the shards between them
(a no-op with one shard):
  1. ce_max_and_target: row max of this shard's logits, and the target's logit when the target
     falls in this shard (0 otherwise)           -> reduce max, reduce sum
  2. ce_exp_sum: logits <- exp(logits - max) in place, row sums   -> reduce sum
  3. ce_losses (float64 per-row loss) and, for training, ce_grad: logits <- dlogits =
     grad_scale * (softmax - onehot) / n_valid, in place (no second (N, V) buffer).
With one shard this is exactly the single-pass fused kernel it replaces: exp in float32
(cke_kernels.expf), row sums in float32, log and loss in float64; the loss is the float64 sum
of per-row losses in row order over the count of valid targets (deterministic). Rows with an
ignored target get loss 0 and gradient 0. With no valid target the loss is 0.0 and the
gradient 0: a fully padded micro-batch adds nothing (torch would return nan).
`crossentropy_forward` / `crossentropy_fused_backward` run the passes for a whole vocabulary.
Tests: tests/unit/test_kernels.py::test_crossentropy, tests/ranks/tensor_parallel_mpi.py (the sharded form).
"""
import numpy as np
from numba import njit, prange

from .expf import FAST, expf, rowmax


@njit(cache=True, nogil=True)
def count_valid(targets, ignore_index):
    n = 0
    for i in range(targets.shape[0]):
        if targets[i] != ignore_index:
            n += 1
    return n


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def ce_max_and_target(logits, targets, vocab_start, ignore_index, rmax, tlogit):
    """rmax[i] = max of row i; tlogit[i] = logits[i, targets[i] - vocab_start] if in this shard else 0."""
    N, V = logits.shape
    for i in prange(N):
        t = targets[i]
        if t == ignore_index:
            rmax[i] = 0.0
            tlogit[i] = 0.0
            continue
        rmax[i] = rowmax(logits[i], V)
        j = t - vocab_start
        tlogit[i] = logits[i, j] if 0 <= j < V else np.float32(0.0)


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def ce_exp_sum(logits, targets, ignore_index, rmax, rsum):
    """logits[i] <- exp(logits[i] - rmax[i]) in place; rsum[i] = its float32 sum (ignored rows: 0)."""
    N, V = logits.shape
    for i in prange(N):
        row = logits[i]
        if targets[i] == ignore_index:
            rsum[i] = 0.0
            for j in range(V):
                row[j] = 0.0
            continue
        m = rmax[i]
        s = np.float32(0.0)
        for j in range(V):
            e = expf(row[j] - m)
            row[j] = e
            s += e
        rsum[i] = s


@njit(cache=True, nogil=True)
def ce_losses(targets, ignore_index, rmax, rsum, tlogit):
    """Float64 sum over valid rows of log(sum) + max - target logit (row order)."""
    total = 0.0
    for i in range(targets.shape[0]):
        if targets[i] != ignore_index:
            total += np.log(np.float64(rsum[i])) + rmax[i] - tlogit[i]
    return total


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def ce_grad(expd, targets, vocab_start, ignore_index, rsum, dscale):
    """expd (the exp pass's output) <- dscale * (softmax - onehot) in place; ignored rows stay 0."""
    N, V = expd.shape
    ds = np.float32(dscale)
    for i in prange(N):
        t = targets[i]
        if t == ignore_index:
            continue
        row = expd[i]
        k = ds / rsum[i]
        for j in range(V):
            row[j] *= k
        j = t - vocab_start
        if 0 <= j < V:
            row[j] -= ds


def check_targets(targets, n_rows, vocab_size, ignore_index):
    if targets.shape != (n_rows,):
        raise ValueError(f"targets must have shape ({n_rows},), got {targets.shape}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bad.any():
        raise ValueError(f"target id {int(targets[bad][0])} is outside the vocabulary [0, {vocab_size}) "
                         f"(and is not ignore_index={ignore_index})")


def _whole(logits, targets, ignore_index, grad_scale):
    N = logits.shape[0]
    check_targets(targets, N, logits.shape[1], ignore_index)
    n = count_valid(targets, ignore_index)
    rmax, tlogit, rsum = (np.empty(N, np.float32) for _ in range(3))
    ce_max_and_target(logits, targets, 0, ignore_index, rmax, tlogit)
    ce_exp_sum(logits, targets, ignore_index, rmax, rsum)
    if grad_scale is not None:
        ce_grad(logits, targets, 0, ignore_index, rsum, float(grad_scale) / max(n, 1))
    return ce_losses(targets, ignore_index, rmax, rsum, tlogit) / n if n else 0.0


def crossentropy_forward(logits, targets, ignore_index=-100):
    """logits (N, V) float32, targets (N,) int64 -> mean loss (float); logits are left as they are."""
    return float(_whole(logits.copy(), targets, ignore_index, None))


def crossentropy_fused_backward(logits, targets, ignore_index=-100, grad_scale=1.0):
    """Mean loss (float); overwrites logits (N, V) with grad_scale * dloss/dlogits."""
    return float(_whole(logits, targets, ignore_index, grad_scale))
