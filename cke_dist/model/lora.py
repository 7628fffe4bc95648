"""LoRA (Hu et al., 2021): the base model frozen, low-rank adapters trained beside its projections.

    lm = LoraModel(load_model(base_dir, tp_group=g, stage=s), LoraSettings(8, 16.0, 0.0, ("q_proj", "v_proj")))
    lm.forward_backward(x, y)          # grads of the adapters only (lm.grads); the base has none
    merge_adapter(model, tensors, settings)   # W += alpha/r * B @ A, in place (exports, generate, serve)

Each target projection W (out x in) gains alpha/r * B A x with A (r x in) and B (out x r), computed as
PEFT computes it: dropout on the adapter's input, A drawn kaiming-uniform (a = sqrt(5)), B zeros, the
tensors under PEFT's names (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), so a
checkpoint of one process is an adapter directory `peft.PeftModel.from_pretrained` reads.

`LoraModel` presents the training interface of `Model` (params, grads, specs, forward_backward,
backward, ...) over the adapters' own flat buffers: the optimizer, data-parallel buckets, ZeRO and
checkpoints see only adapters, and the base keeps no gradient buffer. The base calls back into the
adapter right after each target projection (`Model.adapter`), forward and backward.

Tensor parallelism follows the base's cut. Column-parallel targets (q/k/v, gate/up): A is replicated
and B is cut by output rows like W; each rank's A gradient is a partial sum (its rows of B), summed
over the tp group with the KV replicas (`grad_sums`). Row-parallel targets (o, down): A is cut by
input columns like W, B replicated; A x is summed over tp (one allreduce of tokens x r) and B's
product added after the base's own allreduce, as its bias is.

QLoRA: `Model.quantize_frozen("q8_0" | "q4_0" | "q4_1")` holds the frozen projections as GGML blocks,
dequantized when read (lora.quantize_base); the adapters train in float32 as above.

Dropout draws a row's mask from (seed, step, the row's tokens, layer, target group): the same mask in
every layout, and a resumed run draws what the uninterrupted one would have. The targets of one group
(q/k/v, gate/up) share their input and its mask; PEFT draws one per target.
Tests: tests/integration/test_lora.py.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass

import numpy as np

from cke_dist.model.layout import ParamSpec, Stage, kv_holders, layer_names, offsets, param_specs

F32 = np.float32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the base's fused projections and which targets each carries, in the order of its output columns
GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)),
          ("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",)))
COLUMN_PARALLEL = ("qkv", "gate_up")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_STEM = "adapter_model"


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @staticmethod
    def parse_targets(text: str) -> tuple[str, ...]:
        """"all-linear" (PEFT's word for every projection) or a comma list of TARGETS names."""
        if text.strip() == "all-linear":
            return TARGETS
        names = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in names if t not in TARGETS]
        if bad or not names:
            raise ValueError(f"lora.targets = {text!r}: {'unknown ' + repr(bad[0]) if bad else 'empty'}; "
                             f"use \"all-linear\" or a comma list of {', '.join(TARGETS)}")
        return tuple(t for t in TARGETS if t in names)

    def peft_config(self, base: str) -> dict:
        """adapter_config.json as PEFT writes it for these settings."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
                "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": list(self.targets), "bias": "none", "fan_in_fan_out": False,
                "inference_mode": True, "use_rslora": False, "use_dora": False, "modules_to_save": None}

    @classmethod
    def from_peft(cls, cfg: dict, where) -> "LoraSettings":
        if cfg.get("peft_type") != "LORA" or cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("bias", "none") != "none":
            raise ValueError(f"{where}: only plain LoRA adapters load here (peft_type LORA, no rslora, dora or "
                             f"trained biases)")
        targets = cfg.get("target_modules")
        targets = "all-linear" if targets == "all-linear" else ",".join(targets or [])
        return cls(int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0)),
                   cls.parse_targets(targets))


def peft_name(layer: int, target: str, which: str) -> str:
    mod = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{mod}.{target}.lora_{which}.weight"


def _replicated(name, shape, first):
    return ParamSpec(name, shape, None, 0, 0, (0, math.prod(shape) if first else 0))


def lora_specs(cfg, settings: LoraSettings, tp_size: int = 1, tp_rank: int = 0,
               stage: Stage | None = None) -> list[ParamSpec]:
    """This rank's adapter tensors in flat-buffer order: per layer and target group, the A's side by
    side (one GEMM for the group's shared input), then the B's. Cuts follow the base's specs."""
    stage = stage or Stage.whole(cfg)
    base = {s.name: s for s in param_specs(cfg, tp_size, tp_rank, stage)}
    r, first, out = settings.rank, tp_rank == 0, []
    for i in range(stage.l0, stage.l1):
        names = layer_names(cfg, i)
        for group, targets in GROUPS:
            hf = names[group]
            chosen = [(t, base[n]) for t, n in zip(targets, hf) if t in settings.targets]
            for t, w in chosen:
                if group in COLUMN_PARALLEL:
                    out.append(_replicated(peft_name(i, t, "A"), (r, w.full[1]), first))
                else:
                    out.append(ParamSpec(peft_name(i, t, "A"), (r, w.full[1]), 1, w.start, w.stop,
                                         (0, w.stop - w.start)))
            for t, w in chosen:
                if group in COLUMN_PARALLEL:
                    out.append(ParamSpec(peft_name(i, t, "B"), (w.full[0], r), 0, w.start, w.stop, w.owned))
                else:
                    out.append(_replicated(peft_name(i, t, "B"), (w.full[0], r), first))
    return out


class _Group:
    """One target group of one layer: A of its targets stacked (views of a flat buffer), each B with
    the columns of the base's fused output it adds to."""

    def __init__(self, flat, off, specs, layer, group, targets, col_ranges):
        a_names = [peft_name(layer, t, "A") for t in targets]
        self.A = flat[off[a_names[0]][0]:off[a_names[-1]][1]].reshape(-1, specs[a_names[0]].shape[1])
        self.B = [flat[slice(*off[peft_name(layer, t, "B")])].reshape(specs[peft_name(layer, t, "B")].shape)
                  for t in targets]
        self.cols = [col_ranges[t] for t in targets]
        a = specs[a_names[0]]
        self.full_in = a.full[1]
        self.cut = slice(a.start, a.stop) if a.dim == 1 else slice(None)   # row-parallel: this rank's inputs


class LoraModel:
    """Adapters on a frozen base Model (which this takes over: its gradient buffer is dropped). See
    the module docstring; the methods are Model's, over the adapters."""

    def __init__(self, base, settings: LoraSettings, seed: int = 0):
        if settings.rank < 1:
            raise ValueError(f"lora.rank = {settings.rank}: must be >= 1")
        base.freeze()
        self.base, self.settings, self.seed = base, settings, seed
        self.config, self.tp, self.stage, self.heads = base.config, base.tp, base.stage, base.heads
        self.tp_size, self.tp_rank = base.tp_size, base.tp_rank
        self.specs = lora_specs(self.config, settings, self.tp_size, self.tp_rank, self.stage)
        self.param_offsets = offsets(self.specs)
        self.param_shapes = {s.name: s.shape for s in self.specs}
        self.num_params = sum(s.size for s in self.specs)
        self.params = np.zeros(self.num_params, F32)
        self.grads = np.zeros(self.num_params, F32)
        self.named_params = self._views(self.params)
        self.named_grads = self._views(self.grads)
        self._p, self._g = self._groups(self.params), self._groups(self.grads)
        self.step = 0          # the optimizer step: dropout masks depend on it (set by the training loop)
        self._row_keys = None
        self._init(seed)
        base.adapter = self

    def _views(self, flat):
        return {name: flat[a:b].reshape(self.param_shapes[name]) for name, (a, b) in self.param_offsets.items()}

    def _groups(self, flat):
        cfg, h = self.config, self.heads
        D, I = cfg.head_dim, self.base.inter_range[1] - self.base.inter_range[0]
        cols = {"q_proj": (0, h.n_q * D), "k_proj": (h.n_q * D, (h.n_q + h.n_kv) * D),
                "v_proj": ((h.n_q + h.n_kv) * D, (h.n_q + 2 * h.n_kv) * D),
                "gate_proj": (0, I), "up_proj": (I, 2 * I), "o_proj": (0, cfg.hidden_size),
                "down_proj": (0, cfg.hidden_size)}
        specs = {s.name: s for s in self.specs}
        out = []
        for i in range(self.stage.l0, self.stage.l1):
            layer = {}
            for group, targets in GROUPS:
                chosen = [t for t in targets if t in self.settings.targets]
                if chosen:
                    layer[group] = _Group(flat, self.param_offsets, specs, i, group, chosen, cols)
            out.append(layer)
        return out

    def _init(self, seed):
        """PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a = sqrt(5)), B = 0. Every rank
        draws every full A of the whole model in order and keeps its cut, as Model.from_config does."""
        rng = np.random.default_rng([seed, 0x10A])
        mine = {s.name: s for s in self.specs}
        for spec in lora_specs(self.config, self.settings):
            if ".lora_A." in spec.name:
                bound = 1.0 / math.sqrt(spec.full[1])
                full = rng.uniform(-bound, bound, spec.full).astype(F32)
                if spec.name in mine:
                    self.named_params[spec.name][...] = mine[spec.name].take(full)

    def load_adapter(self, source, where) -> None:
        """This rank's cuts from a TensorSource of full adapter tensors (a checkpoint's files)."""
        for s in self.specs:
            if s.name not in source:
                raise ValueError(f"{where}: no adapter tensor {s.name}; it was saved with other lora.targets "
                                 f"or layers")
            if tuple(source.shape(s.name)) != s.full:
                raise ValueError(f"{where}: {s.name} has shape {tuple(source.shape(s.name))}, expected {s.full} "
                                 f"(lora.rank = {self.settings.rank})")
            self.named_params[s.name][...] = source.read(s.name, s.index)

    # ---- the training interface -----------------------------------------------------------------

    def owned_ranges(self) -> list[tuple[int, int]]:
        out = []
        for s in self.specs:
            lo, hi = s.owned_elems()
            if hi > lo:
                a = self.param_offsets[s.name][0]
                out.append((a + lo, a + hi))
        return out

    def grad_sums(self) -> list[tuple[tuple[int, ...], list[tuple[int, int]]]]:
        """[(tp ranks, flat ranges whose gradients are partial sums over them)]: the A's of
        column-parallel targets (every tp rank) and the B rows of KV heads held by several ranks."""
        if self.tp_size == 1:
            return []
        cfg, h, off, r = self.config, self.heads, self.param_offsets, self.settings.rank
        plan: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        every = tuple(range(self.tp_size))
        for s in self.specs:
            if ".lora_A." in s.name and s.dim is None:
                plan.setdefault(every, []).append(off[s.name])
        for g in range(h.kv0, h.kv1):
            holders = kv_holders(cfg, self.tp_size, g)
            if len(holders) < 2:
                continue
            j = g - h.kv0
            for i in range(self.stage.l0, self.stage.l1):
                for t in ("k_proj", "v_proj"):
                    name = peft_name(i, t, "B")
                    if name in off:
                        a = off[name][0] + j * cfg.head_dim * r
                        plan.setdefault(holders, []).append((a, a + cfg.head_dim * r))
        return sorted(plan.items())

    def zero_grad(self) -> None:
        self.grads.fill(0.0)

    def new_activations(self, B, T):
        return self.base.new_activations(B, T)

    def _keys(self, tokens):
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        self._row_keys = [zlib.crc32(row.tobytes()) for row in tokens.reshape(tokens.shape[0], -1)]

    def forward(self, tokens, positions=None):
        return self.base.forward(tokens, positions=positions)

    def loss(self, tokens, targets, ignore_index: int = -100, positions=None) -> float:
        return self.base.loss(tokens, targets, ignore_index, positions=positions)

    def stage_loss(self, tokens, targets, hidden=None, ignore_index: int = -100, positions=None):
        return self.base.stage_loss(tokens, targets, hidden=hidden, ignore_index=ignore_index, positions=positions)

    def stage_forward(self, tokens, a, hidden=None, positions=None):
        self._keys(tokens)
        return self.base.stage_forward(tokens, a, hidden=hidden, positions=positions)

    def forward_backward(self, tokens, targets, ignore_index: int = -100, grad_scale: float = 1.0,
                         on_grad_ready=None, positions=None) -> float:
        self.base._whole("forward_backward")
        a = self.stage_forward(tokens, self.base._activations(*np.shape(tokens), keep=True), positions=positions)
        return self.backward(a, tokens, targets, ignore_index, grad_scale, on_grad_ready)

    def backward(self, a, tokens, targets, ignore_index: int = -100, grad_scale: float = 1.0,
                 on_grad_ready=None, dout=None, defer: list | None = None):
        """The base's backward (input gradients only) with the adapters' gradients added on the way;
        the adapters' buffer is reported whole at the end (it is small: no overlap to gain)."""
        loss = self.base.backward(a, tokens, targets, ignore_index, grad_scale, dout=dout, defer=defer)
        if on_grad_ready is not None:
            if defer is None:
                on_grad_ready(0, self.num_params)
            else:
                defer.append(lambda: on_grad_ready(0, self.num_params))
        return loss

    # ---- the hooks Model calls ------------------------------------------------------------------

    def _mask(self, l, group, n, full_in, cut):
        """Inverted-dropout multipliers (0 or 1/(1-p)) of an (n tokens, in) input from per-row seeds
        that do not depend on the layout; `cut` selects this rank's input columns."""
        p, gid = self.settings.dropout, [g for g, _ in GROUPS].index(group)
        T = n // len(self._row_keys)
        rows = [(np.random.default_rng([self.seed, self.step, key, self.stage.l0 + l, gid])
                 .random((T, full_in), dtype=F32) >= p)[:, cut] for key in self._row_keys]
        return np.concatenate(rows).astype(F32) * F32(1.0 / (1.0 - p))

    def adapter_forward(self, a, l, group, x, out):
        """out (the base's output of `group` in layer l, this rank's columns) += scale * B A x."""
        g = self._p[l].get(group)
        if g is None:
            return
        s, r = F32(self.settings.scale), self.settings.rank
        cache = a.__dict__.setdefault("lora", {})
        mask = None
        if self.settings.dropout > 0 and a.keep:
            mask = self._mask(l, group, x.shape[0], g.full_in, g.cut)
            x = x * mask
        u = x @ g.A.T
        if group not in COLUMN_PARALLEL:
            self.tp.allreduce(u)          # row-parallel: each rank's A x covers its input columns
        for k, (B, (c0, c1)) in enumerate(zip(g.B, g.cols)):
            out[:, c0:c1] += (s * u[:, k * r:(k + 1) * r]) @ B.T
        if a.keep:
            cache[(l, group)] = (u, x if mask is not None else None, mask)

    def adapter_backward(self, a, l, group, dout, x, dx):
        """Adapter gradients of `group` in layer l from dout (the gradient of the base's output, this
        rank's columns); dx (the gradient of the group's input) += the adapters' share."""
        g, gg = self._p[l].get(group), self._g[l].get(group)
        if g is None:
            return
        s, r = F32(self.settings.scale), self.settings.rank
        u, xd, mask = a.lora.pop((l, group))
        xin = xd if xd is not None else x
        du = np.empty_like(u)
        for k, (B, dB, (c0, c1)) in enumerate(zip(g.B, gg.B, g.cols)):
            d = dout[:, c0:c1]
            dB += s * (d.T @ u[:, k * r:(k + 1) * r])
            np.matmul(d, B, out=du[:, k * r:(k + 1) * r])
        du *= s
        gg.A += du.T @ xin
        share = du @ g.A
        if mask is not None:
            share *= mask
        dx += share


def merge_adapter(model, tensors, settings: LoraSettings) -> None:
    """W += alpha/r * B @ A for every adapted projection of `model` (its tp cut and stage), from a
    source of full adapter tensors (`tensors.read(name, index)`, or a dict of them)."""
    s = F32(settings.scale)
    mine = {sp.name: sp for sp in lora_specs(model.config, settings, model.tp_size, model.tp_rank, model.stage)}

    def read(name):
        sp = mine[name]
        if hasattr(tensors, "read"):
            return np.asarray(tensors.read(name, sp.index), F32)
        return np.asarray(sp.take(np.asarray(tensors[name])), F32)

    for i in range(model.stage.l0, model.stage.l1):
        names = layer_names(model.config, i)
        for group, targets in GROUPS:
            hf = names[group]
            for t, w in zip(targets, hf):
                if t in settings.targets:
                    model.named_params[w] += s * (read(peft_name(i, t, "B")) @ read(peft_name(i, t, "A")))


def read_adapter_config(path) -> LoraSettings:
    p = path / ADAPTER_CONFIG
    return LoraSettings.from_peft(json.loads(p.read_text()), p)
