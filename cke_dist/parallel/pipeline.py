"""Pipeline parallelism: stages of contiguous layers, micro-batches, and the GPipe, 1F1B and
zero-bubble (ZB-H1) schedules.

    stages = stage_layers(cfg.num_hidden_layers, pp)          # cke_dist.model.layout
    model = Model.from_config(cfg, seed, tp_group=grid.tp_group, stage=grid_stage(grid, cfg))
    loss_sum, stats = run_schedule(model, grid, micro_batches, "1f1b", on_grad_ready=buckets.on_grad_ready)

Rules this module keeps:
- A schedule is a list of ops per stage, ("F", i), ("B", i) and, for "zb", ("W", i); `schedule()`
  makes it and the tests read it. GPipe: every F, then every B. 1F1B (Megatron's): p - s - 1
  warm-up forwards on stage s, then one F and one B in turn, then the remaining B's, so at most
  p - s micro-batches are alive on stage s. ZB-H1 (Qi et al. 2023): 1F1B's order with B cut into
  the input gradient (B, on the critical path) and the weight gradient (W), and stage s holding
  back s W's, run after later B's and at the end, where 1F1B's stage s waits for the stages
  before it to finish: the same results, less idle time.
- Activations go forward and their gradients back with point-to-point messages on the pp group
  (its own comm engine): sends are asynchronous, receives block; tags name the micro-batch and
  the direction. A micro-batch's activation set is reused only once its sends have finished and
  its W has run; the sets are kept for the next step (per model and micro-batch shape).
- The micro-batch with the last B of a stage (every schedule's last B is micro-batch m - 1) gets
  `on_grad_ready`, so data-parallel buckets overlap that backward (under "zb", its W's).
- `run_schedule` returns the sum of the micro-batch losses on the last stage (None elsewhere) and
  stats: the peak number of live activation sets and the seconds spent waiting in receives.
Tests: tests/ranks/pipeline_mpi.py, tests/integration/test_pipeline.py.
"""
from __future__ import annotations

import time
import weakref

import numpy as np

from cke_dist.comm.errors import CommError
from cke_dist.model.layout import Stage, param_specs, stage_layers, stage_work

SCHEDULES = ("1f1b", "gpipe", "zb")
FORWARD, BACKWARD = 0, 1
_POOLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {(B, T): [Activations]}


def grid_stage(grid, config, pp_layers=None) -> Stage:
    """This rank's stage of the grid's pipeline."""
    l0, l1 = stage_layers(config.num_hidden_layers, grid.shape.pp, pp_layers, **stage_work(config))[grid.pp_rank]
    return Stage(l0, l1, grid.pp_rank == 0, grid.pp_rank == grid.shape.pp - 1)


def schedule(kind: str, p: int, s: int, m: int) -> list[tuple[str, int]]:
    """The ops of stage s of p for m micro-batches, in the order that stage runs them."""
    if kind not in SCHEDULES:
        raise ValueError(f"parallel.schedule = {kind!r}: one of {', '.join(SCHEDULES)}")
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warm = min(p - s - 1, m)
    ops = [("F", i) for i in range(warm)]
    for i in range(m - warm):
        ops += [("F", warm + i), ("B", i)]
    ops += [("B", i) for i in range(m - warm, m)]
    if kind == "1f1b":
        return ops
    out, held = [], []
    for op in ops:
        out.append(op)
        if op[0] == "B":
            held.append(op[1])
            if len(held) > s:
                out.append(("W", held.pop(0)))
    return out + [("W", i) for i in held]


# Message tags between neighbouring stages, for training and serving alike. Training: a micro-batch's
# activations (FORWARD) and their gradients (BACKWARD). Serving: each engine tick's plan (its header
# and body) and the hidden states that go with it; the last stage's logits, and pooled embeddings,
# back to rank 0.
TICK_HIDDEN, TICK_HEAD, TICK_BODY, TICK_LOGITS, TICK_POOLED = 1, 2, 3, 7, 8


def stage_tag(i: int, direction: int) -> int:
    """The tag of micro-batch i's activations (direction FORWARD) or their gradients (BACKWARD)."""
    if i >= 1 << 15:
        raise ValueError(f"micro-batch {i}: at most {1 << 15} micro-batches per step")
    return 2 * i + direction


def run_schedule(model, grid, micro_batches, kind: str = "1f1b", grad_scale=None, on_grad_ready=None):
    """Forward and backward of every micro-batch through this stage by the schedule; grads ADD into
    model.grads (scaled by grad_scale: one number, a list of one per micro-batch, or default 1/m).
    micro_batches: (inputs, targets) or, packed, (inputs, targets, positions), on every stage.
    Returns (sum of micro-batch losses on the last stage, else None; {"peak_live": .., "wait_s": ..,
    "ops": .., "losses": each micro-batch's loss on the last stage, else []})."""
    st, pg = model.stage, grid.pp_group
    p, s, m = grid.shape.pp, grid.pp_rank, len(micro_batches)
    scale = [1.0 / m] * m if grad_scale is None else (
        list(grad_scale) if isinstance(grad_scale, (list, tuple)) else [grad_scale] * m)
    ops = schedule(kind, p, s, m)
    B, T = np.asarray(micro_batches[0][0]).shape
    C = model.config.hidden_size
    # activation sets outlive the step (allocating and faulting in ~tens of MB per set each step is
    # measurable): kept per model and micro-batch shape
    pool = _POOLS.setdefault(model, {}).setdefault((B, T), [])
    live, sends, deferred = {}, {}, {}
    stats = {"peak_live": 0, "wait_s": 0.0, "ops": ops, "losses": [0.0] * m if st.last else []}
    loss_sum = 0.0 if st.last else None
    grad_in = np.empty((B * T, C), np.float32)

    def acts_for():
        for a in pool:
            if not any(h is not None and not h.is_completed() for h in sends.get(id(a), ())):
                pool.remove(a)
                return a
        return model.new_activations(B, T)

    def recv(buf, src, tag):
        t0 = time.perf_counter()
        try:
            pg.recv(buf, src, tag=tag)
        except CommError as e:   # say which stage waited for which, then the comm layer's where
            what = "activations of" if src < s else "gradients of"
            raise type(e)(f"pipeline stage {s} waiting for the {what} micro-batch {tag // 2} from stage {src}: "
                          f"{e.detail}", op=e.op, group=e.group, peer=e.peer, host=e.host) from e
        stats["wait_s"] += time.perf_counter() - t0

    for op, i in ops:
        x, y, *pos = micro_batches[i]
        last_b = i == m - 1
        if op == "F":
            a = acts_for()
            live[i] = a
            stats["peak_live"] = max(stats["peak_live"], len(live))
            hidden = None
            if not st.first:
                hidden = a.resid[0]
                recv(hidden, s - 1, stage_tag(i, FORWARD))
            model.stage_forward(x, a, hidden=hidden, positions=pos[0] if pos else None)
            if not st.last:
                sends[id(a)] = [pg.send(a.resid[-1], s + 1, tag=stage_tag(i, FORWARD), async_op=True)]
        elif op == "B":
            a = live[i]
            dout = None
            if not st.last:
                dout = grad_in
                recv(dout, s + 1, stage_tag(i, BACKWARD))
            defer = [] if kind == "zb" else None
            loss = model.backward(a, x, y, grad_scale=scale[i], on_grad_ready=on_grad_ready if last_b else None,
                                  dout=dout, defer=defer)
            if st.last:
                loss_sum += loss
                stats["losses"][i] = loss
            if not st.first:
                sends.setdefault(id(a), []).append(pg.send(a.dresid, s - 1, tag=stage_tag(i, BACKWARD), async_op=True))
            if defer is None:
                pool.append(live.pop(i))
            else:
                deferred[i] = defer
        else:   # "W": the weight gradients B left for later
            for job in deferred.pop(i):
                job()
            pool.append(live.pop(i))
    for hs in sends.values():
        for h in hs:
            h.wait()
    return loss_sum, stats


def pipeline_loss(model, grid, tokens, targets, positions=None) -> float:
    """Forward only (evaluation): the mean loss of one batch through every stage, on every stage
    (positions: packed rows', on every stage)."""
    st, pg, s = model.stage, grid.pp_group, grid.pp_rank
    B, T = np.asarray(tokens).shape
    hidden = None
    if not st.first:
        hidden = np.empty((B * T, model.config.hidden_size), np.float32)
        pg.recv(hidden, s - 1, tag=stage_tag(0, FORWARD))
    out = model.stage_loss(tokens, targets, hidden=hidden, positions=positions)
    buf = np.zeros(1, np.float64)
    if st.last:
        buf[0] = out
    else:
        pg.send(np.ascontiguousarray(out), s + 1, tag=stage_tag(0, FORWARD))
    pg.broadcast(buf, root=grid.shape.pp - 1)
    return float(buf[0])


def gather_stages(model, grid, arrays: dict[str, np.ndarray], pp_layers=None) -> dict[str, dict] | None:
    """{key: this rank's flat array (params, an optimizer moment)} -> {key: {HF name: full tensor}} of the
    whole model on pp stage 0 (None on the other stages). Collective over tp and pp: tensors are
    gathered over tp first, then every stage sends its own to stage 0."""
    full = {k: model.full_tensors(v) for k, v in arrays.items()}
    p, s, pg = grid.shape.pp, grid.pp_rank, grid.pp_group
    if p == 1:
        return full
    # every tensor once: a tied last stage's copy of the embedding (owned by no one) stays home
    if s > 0:
        for k in sorted(full):
            for spec in param_specs(model.config, stage=model.stage):
                if spec.owned[1] > spec.owned[0]:
                    pg.send(np.ascontiguousarray(full[k][spec.name]), 0, tag=0)
        return None
    cfg = model.config
    stages = [Stage(l0, l1, r == 0, r == p - 1)
              for r, (l0, l1) in enumerate(stage_layers(cfg.num_hidden_layers, p, pp_layers, **stage_work(cfg)))]
    for r in range(1, p):
        for k in sorted(full):
            for spec in param_specs(cfg, stage=stages[r]):
                if spec.owned[1] > spec.owned[0]:
                    buf = np.empty(spec.full, full[k][next(iter(full[k]))].dtype)
                    pg.recv(buf, r, tag=0)
                    full[k][spec.name] = buf
    return full
