"""Every parameter's Hugging Face name, full shape and tensor-parallel cut: written once, here.

    specs = param_specs(cfg, tp_size=2, tp_rank=1)      # this rank's shards, in flat-buffer order
    spec.full, spec.shape, spec.take(full_tensor)        # the full HF shape, the local one, the cut
    layer_names(cfg, 3)["qkv"]                           # the role -> HF names map of a layer
    heads = attention_heads(cfg, tp_size, tp_rank)       # query / KV heads this rank holds

Training (Model), inference (inference.py), checkpoint load/save and the tests all read this
module; nobody else spells out a tensor name or a cut.

The Megatron split, as this module cuts it:
- q/k/v (column-parallel, by heads): rank r holds query heads [r*H/tp, (r+1)*H/tp) and every KV
  head those query heads use. A KV head used by query heads on several ranks (tp > KV heads, or
  a GQA group that straddles ranks) is held by each of them: a replica. `owned` marks the rows
  one rank counts as its own (the first holder), so a global grad norm counts each row once;
  `kv_replica_holders` names who must sum a replica's gradient. Biases follow their rows.
- gate/up (column-parallel, by rows), o_proj/down_proj (row-parallel, by input columns).
- embedding and LM head (tied or not): vocab-parallel, by rows. A vocabulary that tp does not
  divide is cut into shards one row apart in size (Megatron pads it to a multiple of tp
  instead): no pad row exists, so none can leak into logits, loss, checkpoints or sampling; the
  only padding is in the buffer that gathers full logits for `Model.forward`.
- norms (and o_proj's bias, added after the allreduce): replicated; tp rank 0 owns them.
Tests: tests/integration/test_tensor_parallel.py, tests/integration/test_pipeline.py,
tests/ranks/tensor_parallel_mpi.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from cke_dist.formats.architectures import EMBED, LM_HEAD, NORM
from cke_dist.model.config import LlamaConfig


@dataclass(frozen=True)
class ParamSpec:
    """One tensor of this rank: `full` HF shape, cut along `dim` to [start, stop) (dim None: whole).

    `owned` is the [lo, hi) range of local indices along `dim` (or of the whole tensor when it is
    replicated) that this rank counts as its own, e.g. for the global grad norm."""
    name: str
    full: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    stop: int = 0
    owned: tuple[int, int] = (0, 0)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full
        s = list(self.full)
        s[self.dim] = self.stop - self.start
        return tuple(s)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def index(self) -> tuple:
        """The numpy index of this shard in the full tensor."""
        if self.dim is None:
            return ()
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)

    def take(self, full):
        """This rank's shard of the full tensor (a view)."""
        return full[self.index]

    def owned_elems(self) -> tuple[int, int]:
        """`owned` as a [lo, hi) range of the local tensor's flat elements."""
        if self.dim is None:
            return self.owned
        if self.dim == 0:
            row = self.size // self.shape[0]
            return self.owned[0] * row, self.owned[1] * row
        return 0, self.size   # column cuts never overlap: every rank owns all it holds


def split_range(n: int, parts: int, i: int) -> tuple[int, int]:
    """Part i of [0, n) cut in `parts` contiguous pieces whose sizes differ by at most one (the
    first n % parts are one longer), so no piece is empty while n >= parts and none is padding."""
    q, r = divmod(n, parts)
    return i * q + min(i, r), (i + 1) * q + min(i + 1, r)


@dataclass(frozen=True)
class AttentionHeads:
    """Query heads [q0, q1) and KV heads [kv0, kv1) of one tp rank, and how they pair up."""
    q0: int
    q1: int
    kv0: int
    kv1: int
    group: int                      # query heads per KV head in the full model

    @property
    def n_q(self) -> int:
        return self.q1 - self.q0

    @property
    def n_kv(self) -> int:
        return self.kv1 - self.kv0

    def segments(self) -> list[tuple[int, int, int, int]]:
        """Local (q_lo, q_hi, kv_lo, kv_hi) pieces in which every KV head serves the same number of
        query heads (the attention kernels' GQA layout). One piece when the rank's heads are whole
        groups or a part of one group; one per KV head when a group straddles ranks."""
        counts = []
        for g in range(self.kv0, self.kv1):
            lo, hi = max(self.q0, g * self.group), min(self.q1, (g + 1) * self.group)
            counts.append(hi - lo)
        if len(set(counts)) == 1:
            return [(0, self.n_q, 0, self.n_kv)]
        out, q = [], 0
        for j, c in enumerate(counts):
            out.append((q, q + c, j, j + 1))
            q += c
        return out


def check_tp(cfg: LlamaConfig, tp_size: int) -> None:
    if tp_size < 1 or cfg.num_attention_heads % tp_size:
        ok = [t for t in range(1, cfg.num_attention_heads + 1) if cfg.num_attention_heads % t == 0]
        raise ValueError(f"tensor parallel size {tp_size} does not divide num_attention_heads "
                         f"({cfg.num_attention_heads}); tp can be one of {ok}")
    for key, n in (("vocab_size", cfg.vocab_size), ("intermediate_size", cfg.intermediate_size)):
        if n < tp_size:
            raise ValueError(f"tensor parallel size {tp_size} exceeds {key} ({n}): a rank would hold nothing")


def attention_heads(cfg: LlamaConfig, tp_size: int = 1, tp_rank: int = 0) -> AttentionHeads:
    check_tp(cfg, tp_size)
    per = cfg.num_attention_heads // tp_size
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    q0, q1 = tp_rank * per, (tp_rank + 1) * per
    return AttentionHeads(q0, q1, q0 // group, (q1 - 1) // group + 1, group)


def kv_holders(cfg: LlamaConfig, tp_size: int, kv_head: int) -> tuple[int, ...]:
    """The tp ranks that hold KV head `kv_head` (more than one: a replica whose grads are summed)."""
    per = cfg.num_attention_heads // tp_size
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    return tuple(range(kv_head * group // per, ((kv_head + 1) * group - 1) // per + 1))


def layer_names(cfg: LlamaConfig, i: int) -> dict[str, list[str]]:
    """Role -> HF names of layer i, in flat-buffer order within each role (q/k/v and gate/up are
    adjacent so each fused projection is one view). Roles absent from the config map to []."""
    p = f"model.layers.{i}."
    return {
        "ln1": [p + "input_layernorm.weight"],
        "qkv": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
        "qkv_bias": [p + f"self_attn.{x}_proj.bias" for x in "qkv"] if cfg.attention_bias else [],
        "o": [p + "self_attn.o_proj.weight"],
        "o_bias": [p + "self_attn.o_proj.bias"] if cfg.o_proj_bias else [],
        "ln2": [p + "post_attention_layernorm.weight"],
        "gate_up": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        "down": [p + "mlp.down_proj.weight"],
    }




def head_name(cfg: LlamaConfig) -> str:
    """The tensor the LM head reads (the embedding when tied)."""
    return EMBED if cfg.tie_word_embeddings else LM_HEAD


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: layers [l0, l1); the first stage also holds the embedding, the last the final
    norm and LM head (with tied embeddings, a copy of the embedding as its head)."""
    l0: int
    l1: int
    first: bool = True
    last: bool = True

    @classmethod
    def whole(cls, cfg: LlamaConfig) -> "Stage":
        return cls(0, cfg.num_hidden_layers, True, True)


def stage_layers(n_layers: int, pp: int, sizes=None, embed_work: float = 1.0, head_work: float = 1.0) -> list[tuple[int, int]]:
    """[l0, l1) of each of pp stages. Default: contiguous layers balanced by work, a layer being 1
    and the embedding (first stage) and the LM head (last stage) `embed_work` and `head_work`
    layers' worth (see `stage_work`); `sizes` (layers per stage) sets the split instead."""
    if sizes:
        sizes = [int(n) for n in sizes]
        if len(sizes) != pp or sum(sizes) != n_layers or min(sizes) < 1:
            raise ValueError(f"parallel.pp_layers = {sizes}: needs {pp} counts (one per stage), each >= 1, "
                             f"summing to num_hidden_layers ({n_layers})")
    else:
        if n_layers < pp:
            raise ValueError(f"pipeline parallel size {pp} exceeds num_hidden_layers ({n_layers}): a stage "
                             f"would hold no layer")
        total = embed_work + n_layers + head_work
        cuts = [0]
        for k in range(1, pp):   # the layer boundary nearest to k/pp of the work, leaving each stage a layer
            want = k * total / pp - embed_work
            lo, hi = cuts[-1] + 1, n_layers - (pp - k)
            cuts.append(min(max(round(want), lo), hi))
        cuts.append(n_layers)
        sizes = [cuts[k + 1] - cuts[k] for k in range(pp)]
    out, l0 = [], 0
    for n in sizes:
        out.append((l0, l0 + n))
        l0 += n
    return out


def stage_work(cfg: LlamaConfig) -> dict[str, float]:
    """The embedding's and the LM head's work in layers, by their matmul weights (what forward and
    backward spend their time on): the lookup has none; the head multiplies by V x C."""
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    layer = C * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D + cfg.num_attention_heads * D * C + 3 * C * I
    return {"embed_work": 0.0, "head_work": cfg.vocab_size * C / layer}


def param_specs(cfg: LlamaConfig, tp_size: int = 1, tp_rank: int = 0, stage: Stage | None = None) -> list[ParamSpec]:
    """This rank's tensors in flat-buffer order: embed, its layers, final norm, lm_head (a tied last
    stage that is not also the first holds the embedding there, as its head; it does not own it)."""
    stage = stage or Stage.whole(cfg)
    C, I, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    heads = attention_heads(cfg, tp_size, tp_rank)
    first = tp_rank == 0

    def replicated(name, shape):
        return ParamSpec(name, shape, None, 0, 0, (0, math.prod(shape) if first else 0))

    def cut(name, shape, dim, start, stop, owned=None):
        return ParamSpec(name, shape, dim, start, stop, (0, stop - start) if owned is None else owned)

    # the KV rows this rank owns: those of KV heads whose first holder it is
    own = [g for g in range(heads.kv0, heads.kv1) if kv_holders(cfg, tp_size, g)[0] == tp_rank]
    kv_owned = ((own[0] - heads.kv0) * D, (own[-1] + 1 - heads.kv0) * D) if own else (0, 0)
    v0, v1 = split_range(V, tp_size, tp_rank)
    i0, i1 = split_range(I, tp_size, tp_rank)
    q_rows, kv_rows = (heads.q0 * D, heads.q1 * D), (heads.kv0 * D, heads.kv1 * D)
    out = [cut(EMBED, (V, C), 0, v0, v1)] if stage.first else []
    for i in range(stage.l0, stage.l1):
        n = layer_names(cfg, i)
        q, k, v = n["qkv"]
        out += [replicated(n["ln1"][0], (C,)),
                cut(q, (H * D, C), 0, *q_rows), cut(k, (KV * D, C), 0, *kv_rows, kv_owned),
                cut(v, (KV * D, C), 0, *kv_rows, kv_owned)]
        if n["qkv_bias"]:
            qb, kb, vb = n["qkv_bias"]
            out += [cut(qb, (H * D,), 0, *q_rows), cut(kb, (KV * D,), 0, *kv_rows, kv_owned),
                    cut(vb, (KV * D,), 0, *kv_rows, kv_owned)]
        out += [cut(n["o"][0], (C, H * D), 1, *q_rows)]
        if n["o_bias"]:
            out += [replicated(n["o_bias"][0], (C,))]
        gate, up = n["gate_up"]
        out += [replicated(n["ln2"][0], (C,)),
                cut(gate, (I, C), 0, i0, i1), cut(up, (I, C), 0, i0, i1),
                cut(n["down"][0], (C, I), 1, i0, i1)]
    if stage.last:
        out += [replicated(NORM, (C,))]
        if not cfg.tie_word_embeddings:
            out += [cut(LM_HEAD, (V, C), 0, v0, v1)]
        elif not stage.first:
            out += [cut(EMBED, (V, C), 0, v0, v1, owned=(0, 0))]
    return out


def param_shapes(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, full shape) of every parameter, in flat-buffer order."""
    return [(s.name, s.full) for s in param_specs(cfg)]


def offsets(specs: list[ParamSpec]) -> dict[str, tuple[int, int]]:
    """name -> [start, stop) of each spec's local tensor in a flat buffer laid out in spec order."""
    out, n = {}, 0
    for s in specs:
        out[s.name] = (n, n + s.size)
        n += s.size
    return out
