"""The Llama / Qwen2 decoder on our kernels: forward, loss, backward, no autograd.

One training step reads top to bottom: `_forward` runs the ops and keeps their
caches in `Activations`; `forward_backward` calls each op's backward in reverse.

Parameters live in one flat float32 buffer in forward order (embed, layers
0..N-1, final norm, lm_head), every Hugging Face name a view into it; gradients
mirror the layout. Inside a layer the order is chosen so that q/k/v weights (and
biases) and gate/up weights are adjacent: each pair/triple is one GEMM on one
view. Backward fills the gradient buffer back to front and reports each finished
range through `on_grad_ready(start, stop)` (data-parallel buckets overlap with it).

Tensor parallelism (Megatron): the model takes `tp_group` (a comm group, or None) and holds
only its shards (cke_dist.model.layout says which); every tp collective goes through `self.tp`
(cke_dist.parallel.tensor_parallel). q/k/v and gate/up are column-parallel, o/down row-parallel, the embedding, LM head and cross-entropy
vocab-parallel. Per layer 2 allreduces of (tokens x hidden) forward and 2 backward, plus the
embedding's, the LM head input gradient's and three (tokens,) ones in the cross-entropy; with a
group of size 1 (or None) they vanish and this is the plain model.
"""
from __future__ import annotations

import math

import numpy as np

from cke_kernels.attention import attention_backward, attention_forward
from cke_kernels.crossentropy import (ce_exp_sum, ce_grad, ce_losses, ce_max_and_target, check_targets,
                                       count_valid)
from cke_kernels.embedding import embedding_backward, embedding_forward
from cke_kernels.linear import linear_backward, linear_forward
from cke_kernels.residual import residual_forward
from cke_kernels.rmsnorm import rmsnorm_backward, rmsnorm_forward
from cke_kernels.rope import qkv_rope_backward, qkv_rope_forward, rope_tables
from cke_kernels.swiglu import swiglu_backward, swiglu_forward
from cke_kernels.threads import use_training_pools

from cke_dist.formats.hf import write_hf_dir
from cke_dist.formats.quant import Quant
from cke_dist.model.config import LlamaConfig
from cke_dist.parallel.tensor_parallel import TensorParallel
from cke_dist.model.layout import (EMBED, LM_HEAD, NORM, Stage, attention_heads, head_name, layer_names, offsets,
                     param_specs, split_range)

F32 = np.float32
RECOMPUTE = ("none", "full")
# the LM head's chunk: rows of logits whose floats stay near 4M (16 MiB), at least 128 rows per GEMM
HEAD_FLOATS, HEAD_MIN_ROWS = 1 << 22, 128


def _heads_view(rows, B, T, H):
    """Token rows (B*T, H*D) seen as (B, H, T, D) without a copy: attention GEMMs write and read
    them in place (BLAS takes the row stride), so no head merge/split pass is needed."""
    return rows.reshape(B, T, H, -1).transpose(0, 2, 1, 3)


class LayerViews:
    """One decoder layer's local parameters (or gradients) as views of a flat buffer; q/k/v (and
    gate/up) are one view each because the layout puts them side by side."""

    def __init__(self, flat, offsets, cfg, i):
        names = layer_names(cfg, i)

        def span(role, cols=None):
            if not names[role]:
                return None
            v = flat[offsets[names[role][0]][0]:offsets[names[role][-1]][1]]
            return v if cols is None else v.reshape(-1, cols)

        C = cfg.hidden_size
        self.ln1, self.ln2 = span("ln1"), span("ln2")
        self.w_qkv, self.b_qkv = span("qkv", C), span("qkv_bias")
        self.w_o, self.b_o = span("o").reshape(C, -1), span("o_bias")
        self.w_gu = span("gate_up", C)
        self.w_down = span("down").reshape(C, -1)
        self.start = offsets[names["ln1"][0]][0]
        self.stop = offsets[names["down"][0]][1]


def _attend(a, l, heads, scale, forward, dy=None):
    """Fused attention of layer l's caches on this rank's heads (backward from dy). Heads whose GQA
    groups straddle ranks come in segments of different group sizes: one kernel call per segment."""
    B, T, j = a.B, a.T, a.slot(l)
    y = _heads_view(a.y[j], B, T, heads.n_q)
    for q0, q1, k0, k1 in heads.segments():
        q, k, v, lse = a.q[j][:, q0:q1], a.k[j][:, k0:k1], a.v[j][:, k0:k1], a.lse[j][:, q0:q1]
        if forward:
            attention_forward(q, k, v, scale, y[:, q0:q1], lse, starts=a.starts)
        else:
            attention_backward(_heads_view(dy, B, T, heads.n_q)[:, q0:q1], q, k, v, y[:, q0:q1], lse, scale,
                               a.dq[:, q0:q1], a.dk[:, k0:k1], a.dv[:, k0:k1], starts=a.starts)


class QuantizedLayer:
    """A frozen layer with its projections quantized (Model.quantize_frozen): the norms and biases
    as float32 copies, each projection dequantized to a new float32 array when read (one layer's
    worth lives at a time)."""

    def __init__(self, W: LayerViews, kind: str):
        copy = lambda v: None if v is None else v.copy()     # noqa: E731
        self.ln1, self.ln2, self.b_qkv, self.b_o = copy(W.ln1), copy(W.ln2), copy(W.b_qkv), copy(W.b_o)
        self._q = {}
        for role in ("w_qkv", "w_o", "w_gu", "w_down"):
            w = getattr(W, role)
            if w.shape[1] % 32:
                raise ValueError(f"a {kind} base needs rows in blocks of 32; this rank's {role} rows have "
                                 f"{w.shape[1]} (use another tp or no base quantization)")
            self._q[role] = Quant.of(np.ascontiguousarray(w), kind)

    w_qkv = property(lambda self: self._q["w_qkv"].dequantized())
    w_o = property(lambda self: self._q["w_o"].dequantized())
    w_gu = property(lambda self: self._q["w_gu"].dequantized())
    w_down = property(lambda self: self._q["w_down"].dequantized())


class Activations:
    """Every buffer one forward/backward of a (B, T) batch needs on this rank, allocated once per shape."""

    def __init__(self, model: "Model", B: int, T: int, keep: bool):
        if keep:    # a training batch: training's pool settings, even in a script that imported numpy first
            use_training_pools()
            if model.recompute not in RECOMPUTE:
                raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {model.recompute!r}")
        cfg = model.config
        N, C, D, L = B * T, cfg.hidden_size, cfg.head_dim, model.stage.l1 - model.stage.l0
        H, KV = model.heads.n_q, model.heads.n_kv
        I, V = model.inter_range[1] - model.inter_range[0], model.vocab_range[1] - model.vocab_range[0]
        # Layer caches kept for backward: every layer's, or (forward-only runs, and training with
        # recompute="full") one layer's worth that each layer reuses. Attention keeps no probabilities
        # (fused: its backward recomputes them from each query's log-sum-exp).
        self.recompute = model.recompute if keep else "none"
        self.per_layer = keep and self.recompute != "full"
        Lk = L if self.per_layer else 1
        e = np.empty
        self.B, self.T, self.keep = B, T, keep
        self.resid = e((L + 1, N, C), F32)        # input of layer l; resid[L] feeds the final norm
        self.xmid = e((Lk, N, C), F32)            # after the attention residual
        self.ln1, self.ln2 = e((Lk, N, C), F32), e((Lk, N, C), F32)
        self.rstd1, self.rstd2 = e((Lk, N), F32), e((Lk, N), F32)
        self.q, self.k, self.v = e((Lk, B, H, T, D), F32), e((Lk, B, KV, T, D), F32), e((Lk, B, KV, T, D), F32)
        self.lse = e((Lk, B, H, T), F32)          # attention: each query's log-sum-exp of its scores
        self.y = e((Lk, N, H * D), F32)           # attention output in token rows (o_proj input), written in place
        self.gu = e((Lk, N, 2 * I), F32)
        self.h = e((Lk, N, I), F32)
        self.lnf, self.rstdf = e((N, C), F32), e((N,), F32)
        # the LM head and the loss run over chunks of token rows (Model._head_loss): one chunk's logits
        # (this rank's vocab columns) live at a time, not the (tokens x vocab) block
        self.head_rows = model.head_rows
        rows = model.head_rows or max(HEAD_MIN_ROWS, HEAD_FLOATS // max(V, 1))
        self.logits = e((min(N, rows), V if model.stage.last else 0), F32)
        self.rmax, self.rsum, self.tlogit = e(N, F32), e(N, F32), e(N, F32)   # cross-entropy row stats
        # scratch, shared by all layers
        self.qkv = e((N, (H + 2 * KV) * D), F32)
        self.tmp = e((N, C), F32)
        self.cos_t, self.sin_t = rope_tables(D, cfg.rope_theta, np.arange(T), cfg.rope_scaling)
        self.use_positions(None)
        if keep:
            self.dresid = e((N, C), F32)
            self.dln = e((N, C), F32)
            self.dy = e((N, H * D), F32)
            self.dq, self.dk, self.dv = e((B, H, T, D), F32), e((B, KV, T, D), F32), e((B, KV, T, D), F32)
            self.dgu = e((N, 2 * I), F32)
            self.dh = e((N, I), F32)

    def slot(self, l):
        """The index of layer l's caches."""
        return l if self.per_layer else 0

    def use_positions(self, positions):
        """Set the rope tables and attention mask of the batch about to run (backward reuses them):
        None, the plain causal 0..T-1; or checked (B, T) positions (Model._check_positions), each
        token's position in its document: per-token tables, and each query's first key."""
        if positions is None:
            self.cos, self.sin, self.starts = self.cos_t, self.sin_t, None
            return
        flat = positions.reshape(-1)
        # rows of the per-position tables: the very numbers an unpacked document gets
        self.cos, self.sin = self.cos_t[flat], self.sin_t[flat]
        self.starts = np.arange(self.T) - positions


class Model:
    """A Llama-family causal LM with flat parameter and gradient buffers, holding this tensor-parallel
    rank's shards only (the whole model when tp_group is None or of size 1).

    Build with `Model.from_config(cfg, seed, tp_group=g)` or `load_model(dir, tp_group=g)`; see
    `forward`, `loss`, `forward_backward`, `zero_grad`, `save`. With a tp group every method is
    collective over it: all its ranks call it with the same inputs.
    """

    def __init__(self, config: LlamaConfig, tp_group=None, stage: Stage | None = None):
        self.config = config
        self.tp = TensorParallel.of(tp_group)
        self.tp_size, self.tp_rank = self.tp.size, self.tp.rank
        self.stage = stage or Stage.whole(config)
        self.specs = param_specs(config, self.tp_size, self.tp_rank, self.stage)
        self.heads = attention_heads(config, self.tp_size, self.tp_rank)
        self.vocab_range = split_range(config.vocab_size, self.tp_size, self.tp_rank)
        self.inter_range = split_range(config.intermediate_size, self.tp_size, self.tp_rank)
        self.param_offsets: dict[str, tuple[int, int]] = offsets(self.specs)
        self.param_shapes: dict[str, tuple[int, ...]] = {s.name: s.shape for s in self.specs}
        n = self.num_params = sum(s.size for s in self.specs)
        self.params = np.zeros(n, dtype=F32)
        self.grads = np.zeros(n, dtype=F32)
        self.named_params = self._views(self.params)
        self.named_grads = self._views(self.grads)
        self._p = self._layout(self.params)
        self._g = self._layout(self.grads)
        self._grads_zero = True   # grads known to be all zero: backward may write instead of add
        self._acts_train: Activations | None = None
        self._acts_eval: Activations | None = None
        self._scratch = None
        self.adapter = None       # a LoraModel adding its adapters after each target projection
        # activation recomputation in training (RECOMPUTE): "none" keeps every layer's caches for
        # backward, "full" only each layer's input, rerunning the layer's forward in backward
        self.recompute = "none"
        self.head_rows = None     # token rows per LM-head chunk (None: ~16 MiB of logits, HEAD_FLOATS)

    def freeze(self) -> None:
        """No gradients for these weights (a LoRA base): the gradient buffer goes, backward computes
        only what flows to the inputs."""
        self.grads = self.named_grads = self._g = None

    def quantize_frozen(self, kind: str) -> None:
        """Hold the q/k/v, o, gate/up and down projections of a frozen model as `kind` blocks
        (QLoRA): the float32 flat buffer goes, the other tensors are kept as copies, and each
        projection is dequantized when forward or backward reads it."""
        if self.grads is not None:
            raise ValueError("quantize_frozen: only a frozen model (freeze()) is held quantized")
        cfg, st = self.config, self.stage
        layers = [QuantizedLayer(W, kind) for W in self._p["layers"]]
        proj = {n for i in range(st.l0, st.l1) for role in ("qkv", "o", "gate_up", "down")
                for n in layer_names(cfg, i)[role]}
        self.named_params = {n: v.copy() for n, v in self.named_params.items() if n not in proj}
        self._p = {"embed": self.named_params.get(EMBED) if st.first else None, "norm": self.named_params.get(NORM),
                   "lm_head": self.named_params[head_name(cfg)] if st.last else None, "layers": layers}
        self.params = None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: LlamaConfig, seed: int = 0, tp_group=None, init_std: float | None = None,
                    stage: Stage | None = None):
        """New model with Hugging Face's initialisation: normal(0, initializer_range) weights,
        ones for norms, zeros for biases; deterministic for a seed. Every rank draws each full
        tensor of the whole model in order and keeps its shards (and its stage's tensors), so they
        are exactly the one-process model's."""
        model = cls(config, tp_group=tp_group, stage=stage)
        std = init_std if init_std is not None else float(config.extra.get("initializer_range", 0.02))
        rng = np.random.default_rng(seed)
        mine = {s.name: s for s in model.specs}
        for spec in param_specs(config):
            if spec.name.endswith("norm.weight") or spec.name.endswith(".bias"):
                full = None
            else:   # drawn on every rank, kept or not, so the stream stays the one-process one
                full = rng.standard_normal(spec.full, dtype=F32) * F32(std)
            if spec.name in mine:
                view = model.named_params[spec.name]
                view[...] = 1.0 if spec.name.endswith("norm.weight") else 0.0 if full is None \
                    else mine[spec.name].take(full)
        return model

    def _views(self, flat):
        return {name: flat[a:b].reshape(self.param_shapes[name]) for name, (a, b) in self.param_offsets.items()}

    def _layout(self, flat):
        cfg, off, st = self.config, self.param_offsets, self.stage
        v = self._views(flat)
        return {"embed": v.get(EMBED) if st.first else None, "norm": v.get(NORM),
                "lm_head": v[head_name(cfg)] if st.last else None,
                "layers": [LayerViews(flat, off, cfg, i) for i in range(st.l0, st.l1)]}

    def load_state_dict(self, tensors: dict, source: str = "state dict") -> None:
        """Copy named full-size float arrays (this rank's shard of each) into the flat buffer; every
        name and full shape must match the config."""
        full_shapes = {s.name: s.full for s in self.specs}
        expected = set(full_shapes)
        # checkpoints of tied models written by some tools still carry lm_head.weight: it must equal the embedding
        names = set(tensors)
        if self.config.tie_word_embeddings and LM_HEAD in names:
            if not np.array_equal(tensors[LM_HEAD], tensors.get(EMBED)):
                raise ValueError(f"{source}: config.json has tie_word_embeddings=true but lm_head.weight "
                                 f"differs from model.embed_tokens.weight; set tie_word_embeddings=false")
            names.discard(LM_HEAD)
        check_names(expected, names, source)
        for spec in self.specs:
            arr = np.asarray(tensors[spec.name])
            if tuple(arr.shape) != spec.full:
                raise ValueError(f"{source}: tensor {spec.name} has shape {tuple(arr.shape)}, "
                                 f"the config expects {spec.full}")
            self.named_params[spec.name][...] = spec.take(arr)

    # ---- shards <-> the one-process layout (collective over tp) -----------------------------------

    def gather_flat(self, local: np.ndarray) -> np.ndarray:
        """A flat array in this rank's layout (params, grads, optimizer state) -> the same array in
        the one-process layout (of this pipeline stage's tensors), on every tp rank (one allgather)."""
        if self.tp_size == 1:
            return local
        cfg, tp = self.config, self.tp_size
        every = [param_specs(cfg, tp, r, self.stage) for r in range(tp)]
        width = max(sum(s.size for s in specs) for specs in every)
        send = np.zeros(width, local.dtype)
        send[:local.size] = local
        recv = np.empty(tp * width, local.dtype)
        self.tp.allgather(send, recv)
        full_specs = param_specs(cfg, stage=self.stage)
        full_off = offsets(full_specs)
        out = np.empty(sum(s.size for s in full_specs), local.dtype)
        for r, specs in enumerate(every):
            n = 0
            for s in specs:
                a, b = full_off[s.name]
                s.take(out[a:b].reshape(s.full))[...] = recv[r * width + n:r * width + n + s.size].reshape(s.shape)
                n += s.size
        return out

    def shard_flat(self, full: np.ndarray) -> np.ndarray:
        """The inverse of gather_flat: this rank's part of a one-process-layout flat array."""
        if self.tp_size == 1:
            return full
        specs = param_specs(self.config, stage=self.stage)
        return self.shard_named({s.name: full[a:b].reshape(s.full) for s, (a, b) in zip(specs, offsets(specs).values())})

    def shard_named(self, full: dict) -> np.ndarray:
        """{HF name: full tensor} (any superset of this rank's) -> a flat array in this rank's layout."""
        out = np.empty(self.num_params, next(iter(full.values())).dtype)
        for s in self.specs:
            c, d = self.param_offsets[s.name]
            out[c:d] = s.take(full[s.name]).reshape(-1)
        return out

    def full_tensors(self, local: np.ndarray) -> dict[str, np.ndarray]:
        """{HF name: full tensor} of this stage from a flat array in this rank's layout (collective over tp)."""
        full = self.gather_flat(local)
        specs = param_specs(self.config, stage=self.stage)
        return {s.name: full[a:b].reshape(s.full) for s, (a, b) in zip(specs, offsets(specs).values())}

    def save(self, out_dir, max_shard_bytes=None) -> None:
        """Write config.json + model.safetensors (HF names, full tensors) into out_dir. Collective
        over tp: the shards are gathered and tp rank 0 writes. A whole model only (one stage)."""
        if not (self.stage.first and self.stage.last):
            raise ValueError("Model.save writes a whole model; a pipeline stage's tensors are gathered by "
                             "cke_dist.formats.checkpoint")
        tensors = self.full_tensors(self.params)
        if self.tp_rank == 0:
            write_hf_dir(out_dir, self.config.to_dict(), tensors, max_shard_bytes=max_shard_bytes)

    def owned_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) ranges of the flat buffer this rank counts as its own: over the tp group they
        cover every parameter of the model exactly once (the global grad norm sums them)."""
        out = []
        for s in self.specs:
            lo, hi = s.owned_elems()
            if hi > lo:
                a = self.param_offsets[s.name][0]
                if out and out[-1][1] == a + lo:
                    out[-1] = (out[-1][0], a + hi)
                else:
                    out.append((a + lo, a + hi))
        return out

    # ---- tensor-parallel communication --------------------------------------------------------

    def _head_loss(self, a, targets, ignore_index, grad_scale=None, head_backward=None):
        """The last stage's LM head and vocab-parallel cross-entropy over a.lnf, in chunks of
        a.logits' rows (three allreduces of the chunk's row stats each): the mean loss over non-ignored
        targets. With grad_scale, each chunk's logits become grad_scale * dloss/dlogits in place and go
        to head_backward(dlogits, r0, r1) before the next chunk overwrites them."""
        N = targets.size
        check_targets(targets, N, self.config.vocab_size, ignore_index)
        n = count_valid(targets, ignore_index)
        v0, W, R = self.vocab_range[0], self._p["lm_head"], a.logits.shape[0]
        total = 0.0
        for r0 in range(0, N, R):
            r1 = min(N, r0 + R)
            lg, t = a.logits[:r1 - r0], targets[r0:r1]
            rmax, rsum, tlogit = a.rmax[r0:r1], a.rsum[r0:r1], a.tlogit[r0:r1]
            linear_forward(a.lnf[r0:r1], W, None, lg)                  # vocab-parallel LM head
            ce_max_and_target(lg, t, v0, ignore_index, rmax, tlogit)
            self.tp.vocab_max_and_target(rmax, tlogit)
            ce_exp_sum(lg, t, ignore_index, rmax, rsum)
            self.tp.allreduce(rsum)
            total += ce_losses(t, ignore_index, rmax, rsum, tlogit)
            if grad_scale is not None:
                ce_grad(lg, t, v0, ignore_index, rsum, float(grad_scale) / max(n, 1))
                head_backward(lg, r0, r1)
        return float(total / n) if n else 0.0

    # ---- forward ------------------------------------------------------------------------------

    def _check_tokens(self, tokens, what="tokens"):
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"{what} must be a (batch, seq) integer array, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{what} must be integers, got dtype {tokens.dtype}")
        return np.ascontiguousarray(tokens, dtype=np.int64)

    def _activations(self, B, T, keep):
        # Two sets: training caches (every layer) and a lean forward-only set, so an evaluation
        # batch of another shape between training steps does not reallocate the training set.
        tr = self._acts_train
        if tr is not None and tr.B == B and tr.T == T and (not keep or tr.recompute == self.recompute) \
                and tr.head_rows == self.head_rows:
            return tr
        if keep:
            self._acts_train = None   # free the old set before allocating the new one
            self._acts_train = Activations(self, B, T, keep=True)
            return self._acts_train
        ev = self._acts_eval
        if ev is None or ev.B != B or ev.T != T or ev.head_rows != self.head_rows:
            self._acts_eval = None
            ev = self._acts_eval = Activations(self, B, T, keep=False)
        return ev

    def new_activations(self, B, T) -> Activations:
        """A training set of buffers (every layer's caches) for one micro-batch in flight: a pipeline
        schedule keeps one per micro-batch between its forward and its backward."""
        return Activations(self, B, T, keep=True)

    def _check_positions(self, tokens, positions):
        """None, or (B, T) int64 positions that restart at 0 where a document starts and otherwise
        count up by one; a batch of whole rows 0..T-1 is None (the plain causal kernels)."""
        if positions is None:
            return None
        p = np.asarray(positions)
        if p.shape != tokens.shape:
            raise ValueError(f"positions shape {p.shape} differs from tokens shape {tokens.shape}")
        if not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"positions must be integers, got dtype {p.dtype}")
        p = np.ascontiguousarray(p, dtype=np.int64)
        ok = np.empty(p.shape, bool)
        ok[:, 0] = p[:, 0] == 0
        ok[:, 1:] = (p[:, 1:] == 0) | (p[:, 1:] == p[:, :-1] + 1)
        if not ok.all():
            b, t = np.argwhere(~ok)[0]
            raise ValueError(f"positions[{b}, {t}] = {p[b, t]}: a position is 0 (a document starts) or the "
                             f"previous position + 1{'' if t == 0 else f' (here {p[b, t - 1]})'}")
        return None if (p == np.arange(p.shape[1])).all() else p

    def _forward(self, tokens, keep, a=None, hidden=None, positions=None):
        """This stage's forward of a (B, T) batch: from the tokens (first stage) or from the previous
        stage's output `hidden` (B*T, C); the last stage ends in this rank's logits columns.
        positions: None (0..T-1 in every row) or each token's position in its document (packed rows:
        attention stays inside a document)."""
        cfg, P, st = self.config, self._p, self.stage
        B, T = tokens.shape
        positions = self._check_positions(tokens, positions)
        if T > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {cfg.vocab_size})")
        a = a or self._activations(B, T, keep)
        a.use_positions(positions)
        if st.first:
            embedding_forward(tokens.reshape(-1), P["embed"], a.resid[0], self.vocab_range[0])
            self.tp.allreduce(a.resid[0])                # vocab-parallel embedding: each row from one rank
        else:
            a.resid[0][...] = hidden.reshape(a.resid[0].shape)
        for l, W in enumerate(P["layers"]):
            self._layer_forward(a, l, W)
        if st.last:   # the LM head runs in chunks with the loss (_head_loss), or whole in forward()
            rmsnorm_forward(a.resid[-1], P["norm"], cfg.rms_norm_eps, a.lnf, a.rstdf)
        return a

    def _layer_forward(self, a, l, W):
        """Layer l from a.resid[l] to a.resid[l + 1], its caches in a.slot(l) (also the recomputation
        of a layer in backward: the same ops on the same input give the same caches)."""
        cfg, ad = self.config, self.adapter
        H, KV = self.heads.n_q, self.heads.n_kv
        scale = 1.0 / math.sqrt(cfg.head_dim)
        j = a.slot(l)
        x = a.resid[l]
        rmsnorm_forward(x, W.ln1, cfg.rms_norm_eps, a.ln1[j], a.rstd1[j])
        linear_forward(a.ln1[j], W.w_qkv, W.b_qkv, a.qkv)          # column-parallel: local heads
        if ad:
            ad.adapter_forward(a, l, "qkv", a.ln1[j], a.qkv)
        qkv_rope_forward(a.qkv, a.cos, a.sin, H, KV, a.q[j], a.k[j], a.v[j])
        _attend(a, l, self.heads, scale, forward=True)
        linear_forward(a.y[j], W.w_o, None, a.tmp)                 # row-parallel: partial sums
        self.tp.allreduce(a.tmp)
        if ad:
            ad.adapter_forward(a, l, "o", a.y[j], a.tmp)
        if W.b_o is not None:                                      # the bias once, after the sum
            a.tmp += W.b_o
        residual_forward(x, a.tmp, a.xmid[j])
        rmsnorm_forward(a.xmid[j], W.ln2, cfg.rms_norm_eps, a.ln2[j], a.rstd2[j])
        linear_forward(a.ln2[j], W.w_gu, None, a.gu[j])            # column-parallel
        if ad:
            ad.adapter_forward(a, l, "gate_up", a.ln2[j], a.gu[j])
        swiglu_forward(a.gu[j], a.h[j])
        linear_forward(a.h[j], W.w_down, None, a.tmp)              # row-parallel
        self.tp.allreduce(a.tmp)
        if ad:
            ad.adapter_forward(a, l, "down", a.h[j], a.tmp)
        residual_forward(a.xmid[j], a.tmp, a.resid[l + 1])

    def _whole(self, what):
        if not (self.stage.first and self.stage.last):
            raise ValueError(f"{what} runs a whole model; a pipeline stage runs through cke_dist.parallel.pipeline")

    def forward(self, tokens, positions=None) -> np.ndarray:
        """tokens (B, T) ints -> logits (B, T, V) float32 (a new array; gathered over tp).
        positions (B, T): each token's position in its document (packed rows), or None."""
        self._whole("forward")
        tokens = self._check_tokens(tokens)
        a = self._forward(tokens, keep=False, positions=positions)
        B, T = tokens.shape
        V = self.config.vocab_size
        logits = np.empty((B * T, self.vocab_range[1] - self.vocab_range[0]), F32)
        linear_forward(a.lnf, self._p["lm_head"], None, logits)         # vocab-parallel LM head
        return self.tp.gather_vocab(logits, V).reshape(B, T, V)

    def loss(self, tokens, targets, ignore_index: int = -100, positions=None) -> float:
        """Mean cross-entropy over non-ignored targets, forward only (for evaluation)."""
        self._whole("loss")
        tokens = self._check_tokens(tokens)
        targets = self._check_targets(tokens, targets)
        a = self._forward(tokens, keep=False, positions=positions)
        return self._head_loss(a, targets.reshape(-1), ignore_index)

    def stage_loss(self, tokens, targets, hidden=None, ignore_index: int = -100, positions=None):
        """Forward only through this stage: the loss (last stage) or the output hidden states (a view,
        valid until the next forward)."""
        tokens = self._check_tokens(tokens)
        targets = self._check_targets(tokens, targets)
        a = self._forward(tokens, keep=False, hidden=hidden, positions=positions)
        return self._head_loss(a, targets.reshape(-1), ignore_index) if self.stage.last else a.resid[-1]

    def _check_targets(self, tokens, targets):
        targets = self._check_tokens(targets, "targets")
        if targets.shape != tokens.shape:
            raise ValueError(f"targets shape {targets.shape} differs from tokens shape {tokens.shape}")
        return targets

    # ---- backward -----------------------------------------------------------------------------

    def zero_grad(self) -> None:
        """Zero the gradient buffer. The next backward then writes its gradients instead of adding
        them (one memory pass less per weight), so write nothing into grads in between."""
        self.grads.fill(0.0)
        self._grads_zero = True

    def _scratch_for(self, size):
        if self._scratch is None or self._scratch.size < size:
            self._scratch = np.empty(size, dtype=F32)
        return self._scratch

    def forward_backward(self, tokens, targets, ignore_index: int = -100, grad_scale: float = 1.0,
                         on_grad_ready=None, positions=None) -> float:
        """Mean cross-entropy over non-ignored targets; ADDS grad_scale * dloss/dparams into self.grads.
        positions (B, T): each token's position in its document (packed rows), or None.

        on_grad_ready(start, stop) is called as soon as grads[start:stop] are final for this call,
        last layer first; the calls cover the flat buffer exactly once. With tp, the gradients of
        KV-head replicas are partial sums until cke_dist.parallel sums them over their holders.
        """
        self._whole("forward_backward")
        tokens = self._check_tokens(tokens)
        targets = self._check_targets(tokens, targets)
        a = self._forward(tokens, keep=True, positions=positions)
        return self.backward(a, tokens, targets, ignore_index, grad_scale, on_grad_ready)

    def stage_forward(self, tokens, a: Activations, hidden=None, positions=None):
        """Forward of one micro-batch through this stage into `a` (see new_activations); its output for
        the next stage is a.resid[-1] (B*T, C). `a` keeps the positions' tables for its backward."""
        return self._forward(self._check_tokens(tokens), keep=True, a=a, hidden=hidden, positions=positions)

    def backward(self, a: Activations, tokens, targets, ignore_index: int = -100, grad_scale: float = 1.0,
                 on_grad_ready=None, dout=None, defer: list | None = None):
        """Backward of the micro-batch whose forward filled `a`: from the loss (last stage; returns it)
        or from `dout`, the next stage's gradient of this stage's output (returns None). Leaves the
        gradient of this stage's input in a.dresid (non-first stages send it back). The forward's
        positions (rope tables, document mask) come with `a`.

        defer: a list, for a zero-bubble schedule: the weight-gradient GEMMs (and the embedding's) are
        not run but appended as jobs (the W pass), one per layer, each reporting its range to
        on_grad_ready when run; the input gradients (B) and norm weights are done now."""
        cfg, P, G, st = self.config, self._p, self._g, self.stage
        tokens = self._check_tokens(tokens)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        acc = not self._grads_zero or defer is not None
        frozen, ad = G is None, self.adapter
        if frozen:
            # a frozen base: input gradients only; the norms' weight gradients land in a throwaway row
            acc, scratch = False, None
            G = {"lm_head": None, "norm": np.empty(cfg.hidden_size, F32), "layers": [_NoGrads(cfg.hidden_size)] * len(P["layers"])}
        else:
            sizes = [G["lm_head"].size if st.last else 0] + [x for g in G["layers"][:1] for x in (g.w_gu.size, g.w_qkv.size)]
            # the LM head's chunks after the first add their weight gradient
            chunked = st.last and a.logits.shape[0] < a.lnf.shape[0]
            scratch = self._scratch_for(max(sizes)) if acc or chunked else None
        notify = on_grad_ready or (lambda start, stop: None)
        jobs: list = []

        def lin(dout_, x, w, dx, dw, db, add=False):
            if defer is None or (dw is None and db is None):
                linear_backward(dout_, x, w, dx, dw, db, acc or add, scratch)
                return
            linear_backward(dout_, x, w, dx, None, None, acc, scratch)
            kept = dout_.copy()   # the B pass reuses its buffers layer after layer (and chunk after chunk)
            xk = x if a.per_layer else x.copy()   # recompute="full": the next layer's reuse x's slot
            jobs.append(lambda: linear_backward(kept, xk, None, None, dw, db, True, scratch))

        def done(start, stop):
            if frozen:
                return
            if defer is None:
                notify(start, stop)
            else:
                fns = jobs.copy()
                jobs.clear()

                def w_job():
                    for fn in fns:
                        fn()
                    notify(start, stop)
                defer.append(w_job)

        loss = None
        if st.last:
            # lm_head, chunk by chunk as the loss leaves each chunk's gradient (its gradient is the
            # embedding's when tied; the embedding backward then adds to it)
            def head_backward(dlogits, r0, r1):
                lin(dlogits, a.lnf[r0:r1], P["lm_head"], a.dln[r0:r1], G["lm_head"], None, add=r0 > 0)
            loss = self._head_loss(a, self._check_tokens(targets, "targets").reshape(-1), ignore_index,
                                   grad_scale, head_backward)
            self.tp.allreduce(a.dln)
            a.dresid.fill(0.0)
            rmsnorm_backward(a.dln, a.resid[-1], P["norm"], a.rstdf, a.dresid, G["norm"])
            done(self.param_offsets[NORM][0], self.num_params)
        else:
            a.dresid[...] = dout.reshape(a.dresid.shape)

        for l in range(len(P["layers"]) - 1, -1, -1):
            W, GW = P["layers"][l], G["layers"][l]
            if a.recompute == "full":          # this layer's caches again, from its kept input
                self._layer_forward(a, l, W)
            j = a.slot(l)
            # MLP: resid[l+1] = xmid + down(swiglu(gate_up(ln2(xmid))))
            lin(a.dresid, a.h[j], W.w_down, a.dh, GW.w_down, None)
            if ad:
                ad.adapter_backward(a, l, "down", a.dresid, a.h[j], a.dh)
            swiglu_backward(a.dh, a.gu[j], a.dgu)
            lin(a.dgu, a.ln2[j], W.w_gu, a.dln, GW.w_gu, None)
            if ad:
                ad.adapter_backward(a, l, "gate_up", a.dgu, a.ln2[j], a.dln)
            self.tp.allreduce(a.dln)
            rmsnorm_backward(a.dln, a.xmid[j], W.ln2, a.rstd2[j], a.dresid, GW.ln2)
            # attention: xmid = x + o(attn(rope(qkv(ln1(x)))))
            lin(a.dresid, a.y[j], W.w_o, a.dy, GW.w_o, GW.b_o)
            if ad:
                ad.adapter_backward(a, l, "o", a.dresid, a.y[j], a.dy)
            _attend(a, l, self.heads, scale, forward=False, dy=a.dy)
            qkv_rope_backward(a.dq, a.dk, a.dv, a.cos, a.sin, a.qkv)
            lin(a.qkv, a.ln1[j], W.w_qkv, a.dln, GW.w_qkv, GW.b_qkv)
            if ad:
                ad.adapter_backward(a, l, "qkv", a.qkv, a.ln1[j], a.dln)
            self.tp.allreduce(a.dln)
            rmsnorm_backward(a.dln, a.resid[l], W.ln1, a.rstd1[j], a.dresid, GW.ln1)
            done(GW.start, GW.stop)

        if st.first and not frozen:
            if defer is None:
                embedding_backward(tokens.reshape(-1), a.dresid, G["embed"], self.vocab_range[0])
            else:
                kept = a.dresid.copy()
                jobs.append(lambda: embedding_backward(tokens.reshape(-1), kept, G["embed"], self.vocab_range[0]))
            done(0, self.param_offsets[EMBED][1])
        self._grads_zero = False
        return loss


class _NoGrads:
    """A frozen layer's gradient views: no weight gradients, one throwaway row for the norms'."""

    def __init__(self, C):
        self.ln1 = self.ln2 = np.empty(C, F32)
        self.w_qkv = self.b_qkv = self.w_o = self.b_o = self.w_gu = self.w_down = None
        self.start = self.stop = 0


def check_names(expected: set, names: set, source: str) -> None:
    """Every tensor the config needs is there and nothing else (rotary inv_freq buffers aside)."""
    missing = sorted(expected - names)
    unexpected = sorted(n for n in names - expected if not n.endswith("rotary_emb.inv_freq"))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"that the config needs")
    if unexpected:
        raise ValueError(f"{source}: tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                         f"do not belong to this config (check num_hidden_layers, attention_bias, "
                         f"tie_word_embeddings)")
