"""One optimizer step on any dp x pp x tp grid, and the gradients that several ranks share.

    grads = ParallelGrads(model, grid)
    loss, norm = train_step(model, opt, grid, micro_batches, lr, clip, buckets, grads, schedule="1f1b")

The step, top to bottom: zero grads; the micro-batches' forward/backward (pp = 1: one after the
other, the last launching the dp buckets; pp > 1: the pipeline schedule); wait for the dp
buckets; sum what several model-parallel ranks hold twice (`ParallelGrads.sum_shared`); the loss
from the last stage to every stage, averaged over dp; clip by the global norm; opt.step.

Rules:
- Shared gradients are summed after the dp average (both are linear, so the order does not
  change the sum, and the dp buckets keep overlapping backward): KV-head replicas over the tp
  ranks that hold them (one allreduce per set of holders, every layer packed together), and with
  tied embeddings under pp the embedding over its first and last stage (Megatron's embedding
  group), so both copies stay equal.
- The global grad norm counts every parameter once: each rank sums the squares of the ranges it
  owns (cke_dist.model.layout's `owned`), then one (1,) float64 allreduce over tp and one over pp.
  It equals the one-process norm within float64 rounding.
Tests: tests/ranks/tensor_parallel_mpi.py, tests/ranks/pipeline_mpi.py, tests/integration/test_data_parallel.py.
"""
from __future__ import annotations

import math

import numpy as np

from cke_kernels.optim import scale_inplace, sum_squares

from cke_dist.model.layout import EMBED, kv_holders, layer_names
from cke_dist.parallel.pipeline import run_schedule


def grad_norm(grads: np.ndarray) -> float:
    """Global L2 norm of a flat float32 gradient buffer (float64 accumulation)."""
    return float(np.sqrt(sum_squares(grads)))


def clip_grad_norm(grads: np.ndarray, max_norm: float, norm: float | None = None) -> float:
    """torch.nn.utils.clip_grad_norm_ on a flat buffer: returns the norm before clipping and
    scales grads in place by max_norm / (norm + 1e-6) when that is below 1.

    `norm` may be passed in when it was computed elsewhere (e.g. summed across ranks).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if norm is None:
        norm = grad_norm(grads)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        scale_inplace(grads, coef)
    return float(norm)


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


class ParallelGrads:
    """Per-step work on the gradients of a model placed in a grid: `sum_shared()`, `norm()`."""

    def __init__(self, model, grid=None):
        self.model = model
        self.tp = model.tp.group
        self.pp = grid.pp_group if grid is not None and grid.shape.pp > 1 else None
        self.shared = []       # (group, [flat ranges]) whose gradients are summed over the group
        # a LoRA model's own partial sums (cke_dist.model.lora); a whole model's KV-head replicas
        sums = model.grad_sums() if hasattr(model, "grad_sums") else replica_ranges(model)
        for holders, ranges in sums:
            self.shared.append((model.tp.group.split(list(holders)), ranges))
        st = model.stage
        if self.pp is not None and model.config.tie_word_embeddings and (st.first or st.last) \
                and EMBED in model.param_offsets:
            emb = self.pp.split([0, grid.shape.pp - 1])
            self.shared.append((emb, [model.param_offsets[EMBED]]))
        self.buffers = [np.empty(sum(b - a for a, b in r), np.float32) for _, r in self.shared]
        self.owned = model.owned_ranges()

    def sum_shared(self) -> None:
        g = self.model.grads
        for (group, ranges), buf in zip(self.shared, self.buffers):
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
        """L2 norm of the whole model's gradient, the same on every rank of the model."""
        g = self.model.grads
        ss = np.array([sum(sum_squares(g[a:b]) for a, b in self.owned)], np.float64)
        for group in (self.tp, self.pp):
            if group is not None:
                group.allreduce(ss, op="sum")
        return math.sqrt(float(ss[0]))


def train_step(model, opt, grid, micro_batches, lr: float, clip: float, buckets, grads: ParallelGrads | None = None,
               schedule: str = "1f1b", stats: dict | None = None, zero=None, scales=None):
    """One optimizer step; returns (the loss averaged over micro-batches and dp, grad norm or None).

    micro_batches: this dp rank's K (inputs, targets) pairs, or (inputs, targets, positions) triples
    for packed rows (see Model.forward_backward), the same on every rank of a tp group and of a
    pipeline. A non-finite loss raises FloatingPointError on every rank before the
    parameters change. `stats`, when given, receives the pipeline schedule's (run_schedule).
    zero: a cke_dist.parallel.zero.Zero1 (opt then updates its slice only; buckets must not reduce).
    scales: each micro-batch's weight (default 1/K): its mean loss and gradient count that much
    before the dp average. Targets with ignored tokens (chat data) pass dp * n_valid / N_valid of the
    whole step, so the step's loss is the mean over every valid token of the global batch, the
    same in every layout.
    """
    if buckets.grads is not model.grads:
        raise ValueError("train_step: buckets were built over another buffer; use GradBuckets(model.grads, ...)")
    if zero is not None and buckets.active:
        raise ValueError("train_step: with ZeRO-1 the gradients are reduce-scattered; build the buckets with "
                         "no group (GradBuckets(model.grads, None))")
    if buckets.group is not None and tuple(buckets.group.ranks) != tuple(grid.dp_group.ranks):
        raise ValueError(f"train_step: buckets reduce over ranks {buckets.group.ranks}, but the grid's dp group "
                         f"is {grid.dp_group.ranks}; use GradBuckets(model.grads, grid.dp_group)")
    micro_batches = list(micro_batches)
    k = len(micro_batches)
    if k == 0:
        raise ValueError("train_step needs at least one micro-batch")
    if scales is not None and len(scales) != k:
        raise ValueError(f"train_step: {len(scales)} scales for {k} micro-batches")
    grads = grads or ParallelGrads(model, grid)
    model.zero_grad()
    if grid.shape.pp == 1:
        losses = []
        for i, (x, y, *pos) in enumerate(micro_batches):
            last = i == k - 1
            if last:
                buckets.start_step()
            losses.append(model.forward_backward(x, y, grad_scale=1.0 / k if scales is None else scales[i],
                                                 on_grad_ready=buckets.on_grad_ready if last else None,
                                                 positions=pos[0] if pos else None))
    else:
        buckets.start_step()   # only the last micro-batch's backward reports ranges to it
        _, sched = run_schedule(model, grid, micro_batches, schedule, grad_scale=scales,
                                on_grad_ready=buckets.on_grad_ready)
        losses = sched["losses"]
        if stats is not None:
            stats.update(sched)
    if not losses:        # a pipeline stage before the last
        loss = 0.0
    elif scales is None:
        loss = sum(losses) / k
    else:
        loss = sum(v * s for v, s in zip(losses, scales))
    loss_buf = np.array([loss], np.float64)
    if grid.shape.pp > 1:
        grid.pp_group.broadcast(loss_buf, root=grid.shape.pp - 1)
    group = grid.dp_group
    loss_h = group.allreduce(loss_buf, op="avg", async_op=True) if group.size > 1 else None
    buckets.finish()
    grads.sum_shared()
    if zero is not None:
        zero.reduce_scatter_grads()
    if loss_h is not None:
        loss_h.wait()
    loss = float(loss_buf[0])
    if not np.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} (averaged over {group.size} data-parallel ranks, lr {lr:.3g})")
    if zero is None:
        norm = clip_grad_norm(model.grads, clip, norm=grads.norm()) if clip > 0 else None
        opt.step(lr=lr)
    else:
        norm = clip_grad_norm(zero.shard.grads, clip, norm=zero.norm(grads.owned, (grads.tp, grads.pp))) \
            if clip > 0 else None
        opt.step(lr=lr)
        zero.allgather_params()
    return loss, norm
