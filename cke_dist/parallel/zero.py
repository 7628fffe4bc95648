"""ZeRO stage 1: the optimizer state sharded over data parallelism.

    zero = Zero1(model, grid.dp_group)
    opt = AdamW(zero.shard, lr=3e-4)              # any of our optimizers, over this rank's slice only
    loss, norm = train_step(model, opt, grid, micro_batches, lr, clip, buckets, zero=zero)

Each dp rank owns one contiguous slice of the flat parameter buffer (the buffer padded to a multiple
of dp, cut in dp equal parts). A step: backward as usual (no bucket allreduce), the gradients
reduce-scattered with op "avg" (each rank receives the average of its slice only: half the bytes of
an allreduce), the global grad norm from the slices (one scalar allreduce over dp on top of tp/pp),
the optimizer updates its slice, and the slices are allgathered back into every rank's parameters.
Optimizer memory per rank falls by dp; the parameters stay identical on every dp rank (each slice
is computed once and copied). Results equal zero = 0 within float32 rounding (the sums run in
another order). Tests: tests/ranks/data_parallel_mpi.py (zero tests), tests/integration/test_data_parallel.py.
"""
from __future__ import annotations

import math

import numpy as np

from cke_kernels.optim import sum_squares


class _Shard:
    """What an optimizer needs of a model (flat params and grads), for one slice of it."""

    def __init__(self, params, grads):
        self.params, self.grads = params, grads


class Zero1:
    def __init__(self, model, dp_group):
        self.model, self.group = model, dp_group
        n, dp = model.num_params, (dp_group.size if dp_group is not None else 1)
        self.dp = dp
        self.chunk = -(-n // dp)
        r = dp_group.rank if dp_group is not None else 0
        self.lo, self.hi = min(n, r * self.chunk), min(n, (r + 1) * self.chunk)
        self.shard = _Shard(model.params[self.lo:self.hi], model.grads[self.lo:self.hi])
        # a buffer dp does not divide is padded for the collectives (equal parts); one it divides is
        # used as it is, so ZeRO adds no model-sized buffer of its own
        self._exact = self.chunk * dp == n
        self._pad = None if self._exact else np.zeros(self.chunk * dp, np.float32)
        self._mine = np.zeros(self.chunk, np.float32)

    def reduce_scatter_grads(self) -> None:
        """model.grads[lo:hi] <- the dp average of this slice (the rest of model.grads is stale)."""
        if self.dp == 1:
            return
        if self._exact:
            self.group.reduce_scatter(self.model.grads, self._mine, op="avg")
        else:
            self._pad[:self.model.num_params] = self.model.grads
            self.group.reduce_scatter(self._pad, self._mine, op="avg")
        self.shard.grads[...] = self._mine[:self.hi - self.lo]

    def norm(self, owned, groups) -> float:
        """The global grad norm from the slices: owned ranges (every parameter once over tp/pp) cut to
        this slice, summed over dp and the model-parallel groups."""
        g = self.model.grads
        ss = 0.0
        for a, b in owned:
            a, b = max(a, self.lo), min(b, self.hi)
            if b > a:
                ss += sum_squares(g[a:b])
        buf = np.array([ss], np.float64)
        for group in (self.group if self.dp > 1 else None, *groups):
            if group is not None:
                group.allreduce(buf, op="sum")
        return math.sqrt(float(buf[0]))

    def allgather_params(self) -> None:
        if self.dp == 1:
            return
        self._mine[:self.hi - self.lo] = self.shard.params
        if self._exact:   # every slice lands in place, this rank's own included
            self.group.allgather(self._mine, self.model.params)
        else:
            self.group.allgather(self._mine, self._pad)
            self.model.params[...] = self._pad[:self.model.num_params]

    def state_bytes(self, optimizer) -> int:
        """Bytes of optimizer state this rank holds."""
        return sum(v.nbytes for v in optimizer.state_dict().values() if isinstance(v, np.ndarray))

    def full_state(self, optimizer) -> dict:
        """The optimizer's state with its slice arrays allgathered into full flat arrays in this rank's
        model layout (what a checkpoint gathers next). Collective over dp."""
        out = {}
        for k, v in optimizer.state_dict().items():
            if isinstance(v, np.ndarray) and v.shape == (self.hi - self.lo,):
                full = np.zeros(self.chunk * self.dp, v.dtype)
                mine = np.zeros(self.chunk, v.dtype)
                mine[:v.size] = v
                if self.dp > 1:
                    self.group.allgather(mine, full)
                else:
                    full[:v.size] = v
                out[k] = full[:self.model.num_params]
            else:
                out[k] = v
        return out

    def shard_state(self, state: dict) -> dict:
        """Full flat arrays in this rank's model layout -> this rank's slices (for load_state_dict)."""
        n = self.model.num_params
        return {k: (v[self.lo:self.hi] if isinstance(v, np.ndarray) and v.shape == (n,) else v)
                for k, v in state.items()}
