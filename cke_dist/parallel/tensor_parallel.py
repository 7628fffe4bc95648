"""Tensor parallelism, the parts that need the grid: replica gradients and the global grad norm.

The Megatron split itself lives in the model (it takes a tp group; cke_dist.model.layout says
how each tensor is cut). What remains after a backward is here:
- KV-head replicas: when tp exceeds the KV heads, or a GQA group straddles two ranks, several
  tp ranks hold the same KV head, and each backward leaves them a partial gradient. `TPGrads`
  sums those rows over exactly the ranks that hold them (one allreduce per set of holders, all
  layers packed together), once per optimizer step, after the data-parallel average (both are
  linear, so the order does not change the sum, and the dp buckets keep overlapping backward).
- The global grad norm counts every parameter once: each rank sums the squares of the ranges it
  owns (its shards, its first-holder KV rows, and replicated norms on tp rank 0 only), then one
  (1,) float64 allreduce over tp. It equals the one-process norm within float64 rounding.
Tests: tests/tp_mpi.py.
"""
from __future__ import annotations

import math

import numpy as np

from cke_kernels.optim import sum_squares

from ..model.layout import kv_holders, layer_names


def replica_ranges(model) -> list[tuple[tuple[int, ...], list[tuple[int, int]]]]:
    """[(tp ranks holding them, flat [start, stop) ranges of their k/v rows and biases)] for the KV
    heads of this rank that are held by more than one rank, in an order every holder agrees on."""
    if model.tp_size == 1:
        return []
    cfg, h, off = model.config, model.heads, model.param_offsets
    D, C = cfg.head_dim, cfg.hidden_size
    plan: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for g in range(h.kv0, h.kv1):
        holders = kv_holders(cfg, model.tp_size, g)
        if len(holders) < 2:
            continue
        j = g - h.kv0
        ranges = plan.setdefault(holders, [])
        for i in range(cfg.num_hidden_layers):
            names = layer_names(cfg, i)
            for name in names["qkv"][1:]:
                a = off[name][0] + j * D * C
                ranges.append((a, a + D * C))
            for name in names["qkv_bias"][1:]:
                a = off[name][0] + j * D
                ranges.append((a, a + D))
    return sorted(plan.items())


class TPGrads:
    """Per-step gradient work of a tensor-parallel model: `sum_replicas()` after backward (and after
    the dp average), `norm()` for clipping."""

    def __init__(self, model):
        self.model = model
        self.group = model.tp_group if model.tp_size > 1 else None
        self.replicas = []
        for holders, ranges in replica_ranges(model):
            sub = model.tp_group.split(list(holders))
            self.replicas.append((sub, ranges, np.empty(sum(b - a for a, b in ranges), np.float32)))
        self.owned = model.owned_ranges()

    def sum_replicas(self) -> None:
        g = self.model.grads
        for group, ranges, buf in self.replicas:
            n = 0
            for a, b in ranges:
                buf[n:n + b - a] = g[a:b]
                n += b - a
            group.allreduce(buf, op="sum")
            n = 0
            for a, b in ranges:
                g[a:b] = buf[n:n + b - a]
                n += b - a

    def norm(self) -> float:
        """L2 norm of the whole model's gradient, the same on every tp rank."""
        g = self.model.grads
        ss = np.array([sum(sum_squares(g[a:b]) for a, b in self.owned)], np.float64)
        if self.group is not None:
            self.group.allreduce(ss, op="sum")
        return math.sqrt(float(ss[0]))
