"""Data parallelism: the flat gradient buffer averaged bucket by bucket (cke_dist.parallel.step runs the step).

    sync_params(model, grid)                          # dp rank 0's parameters everywhere, checked
    buckets = GradBuckets(model.grads, grid.dp_group, bucket_mb=25)
    buckets.start_step(); model.forward_backward(x, y, on_grad_ready=buckets.on_grad_ready); buckets.finish()

Rules this module keeps:
- A bucket is a slice of the flat gradient buffer (no copies). Buckets are cut
  from the end of the buffer towards its start, the order backward fills it.
- A bucket's allreduce (op "avg") starts asynchronously the moment backward has
  written all of it (the model's `on_grad_ready(start, stop)` callback), so the
  communication of late layers overlaps the backward of early ones.
- With K micro-batches, only the last micro-batch's backward launches buckets:
  the earlier ones just accumulate into the buffer (grad_scale = 1/K each).
- `finish()` waits for every bucket, so the optimizer sees averaged gradients.
  The averaged buffer is bitwise the same on every rank (each element is reduced
  once and copied), so the grad norm, the clip and the optimizer step agree
  bitwise across ranks and the parameters stay identical with no extra traffic.
- The logged loss is the dp-average of the ranks' mean losses; like the gradient
  it equals the single-process mean when every rank scores the same number of
  targets (true for the train job: no ignored targets, equal row counts).
- Timings of backward's callbacks and of bucket launches are recorded
  (`ready_times`, `launch_times`, `backward_end`) so a test can prove the
  overlap is real: buckets launch before backward has reported its last slice.
  `overlap=False` launches every bucket only after backward (the baseline).
Tests: tests/integration/test_data_parallel.py (drives tests/ranks/data_parallel_mpi.py at 2 and 4 ranks; kills
a rank of the train job).
"""
from __future__ import annotations

import time
import zlib

import numpy as np

DEFAULT_BUCKET_MB = 25.0


def cut_buckets(n: int, bucket_elems: int) -> list[tuple[int, int]]:
    """[start, stop) slices of a length-n buffer, last slice first, each <= bucket_elems."""
    if bucket_elems < 1:
        raise ValueError(f"bucket size must hold at least one element, got {bucket_elems}")
    out = []
    stop = n
    while stop > 0:
        start = max(0, stop - bucket_elems)
        out.append((start, stop))
        stop = start
    return out


class GradBuckets:
    """Bucketed, overlapped gradient averaging for one flat gradient buffer over a dp group."""

    def __init__(self, grads: np.ndarray, group, bucket_mb: float = DEFAULT_BUCKET_MB, overlap: bool = True):
        if not isinstance(grads, np.ndarray) or grads.ndim != 1 or not grads.flags.c_contiguous:
            raise ValueError("grads must be the model's flat, contiguous gradient buffer (model.grads)")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb={bucket_mb!r}: the gradient bucket size must be > 0 MB")
        self.grads = grads
        self.group = group
        self.overlap = bool(overlap)
        elems = max(1, int(bucket_mb * 1024 * 1024) // grads.itemsize)
        self.buckets = cut_buckets(grads.size, elems)
        self._reset()

    @property
    def active(self) -> bool:
        return self.group is not None and self.group.size > 1

    def _reset(self):
        self._missing = [stop - start for start, stop in self.buckets]
        self._handles: list = [None] * len(self.buckets)
        self.launch_times: list[float] = []
        self.ready_times: list[float] = []
        self.backward_end: float | None = None
        self.wait_s = 0.0  # time finish() spent waiting: the communication backward did not hide

    def start_step(self):
        """Call before the backward whose gradients are to be reduced (the last micro-batch)."""
        self._reset()

    def on_grad_ready(self, start: int, stop: int):
        """The model's backward callback: grads[start:stop] are final; launch every bucket now complete."""
        if not self.active:
            return
        self.ready_times.append(time.perf_counter())
        for i, (b0, b1) in enumerate(self.buckets):
            lo, hi = max(start, b0), min(stop, b1)
            if lo >= hi:
                continue
            self._missing[i] -= hi - lo
            if self._missing[i] < 0:
                raise RuntimeError(f"gradient range [{start}, {stop}) reported ready twice in one step")
            if self._missing[i] == 0 and self.overlap:
                self._launch(i)

    def _launch(self, i: int):
        b0, b1 = self.buckets[i]
        self.launch_times.append(time.perf_counter())
        self._handles[i] = self.group.allreduce(self.grads[b0:b1], op="avg", async_op=True)

    def finish(self):
        """Wait for every bucket; after this the buffer holds the dp-average of the gradients."""
        self.backward_end = time.perf_counter()
        if not self.active:
            return
        missing = [self.buckets[i] for i, m in enumerate(self._missing) if m]
        if missing:
            raise RuntimeError(f"backward never reported gradient slices {missing[:3]}...; the model's "
                               "on_grad_ready must cover the whole flat buffer (was start_step() called "
                               "before the last micro-batch's backward?)")
        if not self.overlap:
            for i in range(len(self.buckets)):
                self._launch(i)
        for h in self._handles:
            h.wait()
        self.wait_s = time.perf_counter() - self.backward_end


def params_checksum(params: np.ndarray) -> int:
    """crc32 of the parameter bytes: equal on two ranks iff (barring collisions) the bits are."""
    return zlib.crc32(memoryview(np.ascontiguousarray(params)).cast("B"))


def _check_same_size(group, sizes: np.ndarray) -> None:
    if (sizes != sizes[0]).any():
        listing = ", ".join(f"rank {group.ranks[r]}: {int(n):,}" for r, n in enumerate(sizes))
        raise ValueError(f"data-parallel ranks build models of different sizes ({listing} parameters): "
                         "every rank must run the same model config")


def check_params_in_sync(model, grid, what: str = "parameters") -> None:
    """Raise naming every rank whose parameters differ from dp rank 0's (one small allgather)."""
    group = grid.dp_group
    if group.size == 1:
        return
    mine = np.array([model.params.size, params_checksum(model.params)], np.int64)
    every = np.zeros(2 * group.size, np.int64)
    group.allgather(mine, every)
    every = every.reshape(group.size, 2)
    _check_same_size(group, every[:, 0])
    bad = [group.ranks[r] for r in range(group.size) if every[r, 1] != every[0, 1]]
    if bad:
        raise RuntimeError(f"{what} of rank(s) {', '.join(map(str, bad))} differ from rank {group.ranks[0]}'s "
                           f"(crc32 {int(every[0, 1]):#010x}); the data-parallel replicas have diverged")


def sync_params(model, grid) -> None:
    """Rank 0's parameters on every dp rank (broadcast), then a checksum check that names any rank
    that still differs. Model sizes are checked first so a config mismatch is an error, not a hang."""
    group = grid.dp_group
    if group.size == 1:
        return
    sizes = np.zeros(group.size, np.int64)
    group.allgather(np.array([model.params.size], np.int64), sizes)
    _check_same_size(group, sizes)
    group.broadcast(model.params, root=0)
    check_params_in_sync(model, grid, "after the broadcast from rank 0, parameters")


def average_over_dp(value: float, grid) -> float:
    """A per-rank scalar (e.g. the validation loss of this rank's rows) averaged over the dp group."""
    if grid.dp_group.size == 1:
        return float(value)
    buf = np.array([value], np.float64)
    grid.dp_group.allreduce(buf, op="avg")
    return float(buf[0])
