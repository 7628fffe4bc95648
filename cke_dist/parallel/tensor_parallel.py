"""Tensor parallelism, the part that needs more than the model: which gradient rows are replicas.

The Megatron split itself lives in the model (it takes a tp group; cke_dist.model.layout says
how each tensor is cut). When tp exceeds the KV heads, or a GQA group straddles two ranks,
several tp ranks hold the same KV head, and each backward leaves them a partial gradient;
`replica_ranges` says which rows and over which ranks they are summed (cke_dist.parallel.step
does it once per optimizer step).
Tests: tests/tp_mpi.py.
"""
from __future__ import annotations

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
        for i in range(model.stage.l0, model.stage.l1):
            names = layer_names(cfg, i)
            for name in names["qkv"][1:]:
                a = off[name][0] + j * D * C
                ranges.append((a, a + D * C))
            for name in names["qkv_bias"][1:]:
                a = off[name][0] + j * D
                ranges.append((a, a + D))
    return sorted(plan.items())
