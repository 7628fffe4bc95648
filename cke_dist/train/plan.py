"""The memory plan of a training job: per-rank bytes of parameters, gradients, optimizer state and
activations for each layout of a rank count (dp x pp x tp, ZeRO, recomputation), which fit in the
memory a rank has, and the layout the planner picks (`cke-dist plan`).

Nothing is estimated by formula where the code can say it: each candidate builds the rank's real
`Model` shard (its float32 buffers are calloc'd, untouched, so planning a model costs no memory)
and the real `Activations` of one micro-batch, and counts their bytes; the pipeline schedule says how
many micro-batches a stage holds at once. What the code does not own (the interpreter, numpy,
numba's compiled kernels, MPI, the tokenizer) is RUNTIME_BYTES, measured; and a ZeRO-1 checkpoint
gathers the moments over dp before writing them.
Tests: tests/integration/test_plan.py (predictions against measured peak RSS).
"""
from __future__ import annotations

from dataclasses import dataclass

from cke_dist.model import LlamaConfig, Model
from cke_dist.model.layout import Stage, check_tp, stage_layers, stage_work
from cke_dist.model.llama import Activations
from cke_dist.parallel.pipeline import schedule
from cke_dist.parallel.tensor_parallel import TensorParallel

# Peak RSS of the built-in job's process less its model, optimizer and activations (Python, numpy,
# numba and its compiled kernels, mpi4py, tokenizers), measured 2026-12-07
RUNTIME_BYTES = 330 * 2**20
RECOMPUTE = ("none", "full")


@dataclass(frozen=True)
class Layout:
    dp: int
    pp: int
    tp: int
    zero: int
    recompute: str

    def __str__(self):
        return f"dp={self.dp} pp={self.pp} tp={self.tp} zero={self.zero} recompute={self.recompute}"


@dataclass
class Estimate:
    """Bytes per rank (the largest over the layout's ranks: the first pipeline stage, tp rank 0)."""
    layout: Layout
    params: int
    grads: int
    optimizer: int
    activations: int
    other: int
    fits: bool | None = None

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.other


def candidates(config: LlamaConfig, ranks: int, batch_size: int) -> list[Layout]:
    """Every dp x pp x tp of `ranks` the job could run: tp divides the heads, pp at most the layers,
    dp divides the batch; ZeRO-1 where dp > 1; each recomputation setting."""
    out = []
    for tp in range(1, ranks + 1):
        try:
            check_tp(config, tp)
        except ValueError:
            continue
        for pp in range(1, min(config.num_hidden_layers, ranks // tp) + 1):
            if ranks % (tp * pp):
                continue
            dp = ranks // (tp * pp)
            if batch_size % dp:
                continue
            for zero in ((0, 1) if dp > 1 else (0,)):
                for rc in RECOMPUTE:
                    out.append(Layout(dp, pp, tp, zero, rc))
    return out


def in_flight(kind: str, pp: int, stage: int, micro_batches: int) -> int:
    """The most micro-batches whose activations stage `stage` holds at once under the schedule."""
    if pp == 1:
        return 1
    live = most = 0
    for op, _ in schedule(kind, pp, stage, micro_batches):
        live += op == "F"
        live -= op == "B"
        most = max(most, live)
    return most


def estimate(config: LlamaConfig, layout: Layout, batch_size: int, seq_len: int, grad_accum: int = 1,
             schedule_kind: str = "1f1b", optimizer_states: int = 2, pp_layers=None) -> Estimate:
    """Per-rank bytes of `layout` for a job of `batch_size` rows (over dp) x `seq_len` tokens per
    micro-batch, `grad_accum` micro-batches a step; `optimizer_states` float32 moments per parameter
    (AdamW 2, SGD with momentum 1)."""
    B = batch_size // layout.dp
    worst = None
    for s, (l0, l1) in enumerate(stage_layers(config.num_hidden_layers, layout.pp, pp_layers, **stage_work(config))):
        model = Model(config, tp_group=TensorParallel.layout(layout.tp, 0),
                      stage=Stage(l0, l1, s == 0, s == layout.pp - 1))
        model.recompute = layout.recompute
        params = model.params.nbytes
        acts = _activation_bytes(model, B, seq_len) * (
            grad_accum if layout.pp > 1 and schedule_kind == "gpipe" else in_flight(schedule_kind, layout.pp, s, grad_accum))
        acts += _activation_bytes(model, B, seq_len, keep=False)   # evaluation's forward-only set
        opt = optimizer_states * params // (layout.dp if layout.zero else 1)
        # checkpoints stream each tensor to its file, except ZeRO-1's moments, gathered over dp first
        other = RUNTIME_BYTES + (optimizer_states * params if layout.zero else 0)
        if grad_accum > 1:   # the accumulation scratch: the largest weight gradient
            other += 4 * max(s.size for s in model.specs)
        e = Estimate(layout, params, params, opt, acts, other)
        if worst is None or e.total > worst.total:
            worst = e
    return worst


def _activation_bytes(model, B, T, keep=True) -> int:
    a = Activations(model, B, T, keep=keep)
    arrays = {id(v): v for v in vars(a).values() if hasattr(v, "nbytes") and v.base is None}
    return sum(v.nbytes for v in arrays.values())


def pick(estimates: list[Estimate]) -> Estimate | None:
    """The layout to run among those that fit: the fewest model-parallel ranks (tp x pp: dp moves
    only gradients, once a step), then no recomputation (it costs ~1.2x the step), then the least
    memory (ZeRO-1 moves what an allreduce moves, but its checkpoints gather the moments: it can
    peak higher than zero=0)."""
    fit = [e for e in estimates if e.fits]
    if not fit:
        return None
    return min(fit, key=lambda e: (e.layout.tp * e.layout.pp, e.layout.recompute != "none", e.total))


def plan(config: LlamaConfig, ranks: int, rank_memory: int, batch_size: int, seq_len: int, grad_accum: int = 1,
         schedule_kind: str = "1f1b", optimizer_states: int = 2) -> tuple[list[Estimate], Estimate | None]:
    """Every candidate layout's estimate (fits: its total within rank_memory bytes) and the pick."""
    out = []
    for layout in candidates(config, ranks, batch_size):
        e = estimate(config, layout, batch_size, seq_len, grad_accum, schedule_kind, optimizer_states)
        e.fits = e.total <= rank_memory
        out.append(e)
    return out, pick(out)
