"""Tensor parallelism's communication, all of it (Megatron's split: cke_dist.model.layout says how
each tensor is cut, the model calls this group):
- `allreduce` after a row-parallel linear (forward) and before a column-parallel one (backward),
  and for the vocab-parallel embedding;
- `vocab_max_and_target` / `allreduce` of the vocab-parallel cross-entropy's row statistics;
- `gather_vocab`: vocab-parallel logits to full rows on every rank;
- `allgather` for gathering flat shards into the one-process layout.
Size 1 (no communication at all) when there is no group, so the model has one code path.
It knows nothing of models (it sits below cke_dist.model, which holds one); the gradient rows
that several tp ranks share are summed by cke_dist.parallel.step.
Tests: tests/ranks/tensor_parallel_mpi.py.
"""
from __future__ import annotations

import numpy as np


class TensorParallel:
    """A tp group (a cke_dist.comm group, or None for one rank) as the model uses it."""

    def __init__(self, group=None):
        self.group = group if group is not None and group.size > 1 else None
        self.size = group.size if self.group is not None else 1
        self.rank = group.rank if self.group is not None else 0

    @classmethod
    def layout(cls, size: int, rank: int) -> "TensorParallel":
        """Rank `rank` of a tp group of `size` with no group behind it: a model shaped as that rank's
        shard, for counting bytes (cke_dist.train.plan); any collective on it raises."""
        tp = cls(None)
        tp.size, tp.rank = size, rank
        if size > 1:
            tp.group = _NoGroup()
        return tp

    @classmethod
    def of(cls, group) -> "TensorParallel":
        return group if isinstance(group, TensorParallel) else cls(group)

    def allreduce(self, buf, op: str = "sum"):
        if self.group is not None:
            self.group.allreduce(buf, op=op)
        return buf

    def allgather(self, send, recv):
        if self.group is None:
            recv[...] = send.reshape(recv.shape)
        else:
            self.group.allgather(send, recv)
        return recv

    def vocab_max_and_target(self, row_max, target_logit):
        """Each row's max logit and its target's logit over the vocab shards (the target is on one)."""
        self.allreduce(row_max, op="max")
        self.allreduce(target_logit)

    def gather_vocab(self, local, vocab_size: int):
        """(N, V_local) vocab-parallel logits -> (N, V) on every rank (one allgather)."""
        if self.group is None:
            return local.copy()
        N, tp = local.shape[0], self.size
        q, r = divmod(vocab_size, tp)   # cke_dist.model.layout.split_range's cut: the first r one longer
        widths = [q + (i < r) for i in range(tp)]
        chunk = max(widths)             # pad each shard to the longest
        send = np.zeros((N, chunk), local.dtype)
        send[:, :local.shape[1]] = local
        recv = np.empty((tp, N, chunk), local.dtype)
        self.group.allgather(send, recv)
        return np.concatenate([recv[r, :, :w] for r, w in enumerate(widths)], axis=1)


class _NoGroup:
    """The group of TensorParallel.layout: shapes only."""

    def __getattr__(self, name):
        raise RuntimeError(f"a planning layout (TensorParallel.layout) cannot communicate: {name}")
