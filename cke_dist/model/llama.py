"""The Llama / Qwen2 decoder on our kernels: forward, loss, backward, no autograd.

One training step reads top to bottom: `_forward` runs the ops and keeps their
caches in `Activations`; `forward_backward` calls each op's backward in reverse.

Parameters live in one flat float32 buffer in forward order (embed, layers
0..N-1, final norm, lm_head), every Hugging Face name a view into it; gradients
mirror the layout. Inside a layer the order is chosen so that q/k/v weights (and
biases) and gate/up weights are adjacent: each pair/triple is one GEMM on one
view. Backward fills the gradient buffer back to front and reports each finished
range through `on_grad_ready(start, stop)` (data-parallel buckets overlap with it).

Tensor parallelism: the model takes `tp_group` (anything with size/rank/allreduce);
only a group of size 1 (or None) exists today.
"""
from __future__ import annotations

import math

import numpy as np

from cke_kernels.attention import attention_backward, attention_forward
from cke_kernels.crossentropy import crossentropy_forward, crossentropy_fused_backward
from cke_kernels.embedding import embedding_backward, embedding_forward
from cke_kernels.linear import linear_backward, linear_forward
from cke_kernels.residual import residual_forward
from cke_kernels.rmsnorm import rmsnorm_backward, rmsnorm_forward
from cke_kernels.rope import qkv_rope_backward, qkv_rope_forward, rope_tables
from cke_kernels.swiglu import swiglu_backward, swiglu_forward

from .config import LlamaConfig

F32 = np.float32


def param_shapes(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) for every parameter, in flat-buffer order."""
    C, I, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    out = [("model.embed_tokens.weight", (V, C))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (C,)),
                (p + "self_attn.q_proj.weight", (H * D, C)),
                (p + "self_attn.k_proj.weight", (KV * D, C)),
                (p + "self_attn.v_proj.weight", (KV * D, C))]
        if cfg.attention_bias:
            out += [(p + "self_attn.q_proj.bias", (H * D,)),
                    (p + "self_attn.k_proj.bias", (KV * D,)),
                    (p + "self_attn.v_proj.bias", (KV * D,))]
        out += [(p + "self_attn.o_proj.weight", (C, H * D))]
        if cfg.o_proj_bias:
            out += [(p + "self_attn.o_proj.bias", (C,))]
        out += [(p + "post_attention_layernorm.weight", (C,)),
                (p + "mlp.gate_proj.weight", (I, C)),
                (p + "mlp.up_proj.weight", (I, C)),
                (p + "mlp.down_proj.weight", (C, I))]
    out += [("model.norm.weight", (C,))]
    if not cfg.tie_word_embeddings:
        out += [("lm_head.weight", (V, C))]
    return out


def _heads_view(rows, B, T, H):
    """Token rows (B*T, H*D) seen as (B, H, T, D) without a copy: attention GEMMs write and read
    them in place (BLAS takes the row stride), so no head merge/split pass is needed."""
    return rows.reshape(B, T, H, -1).transpose(0, 2, 1, 3)


class _Layer:
    """Views of one decoder layer's parameters (or gradients) in a flat buffer."""

    def __init__(self, flat, offsets, cfg, i):
        p = f"model.layers.{i}."
        C, I = cfg.hidden_size, cfg.intermediate_size
        qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim

        def span(first, last):
            return flat[offsets[p + first][0]:offsets[p + last][1]]

        self.ln1 = span("input_layernorm.weight", "input_layernorm.weight")
        self.w_qkv = span("self_attn.q_proj.weight", "self_attn.v_proj.weight").reshape(qkv, C)
        self.b_qkv = span("self_attn.q_proj.bias", "self_attn.v_proj.bias") if cfg.attention_bias else None
        self.w_o = span("self_attn.o_proj.weight", "self_attn.o_proj.weight").reshape(C, -1)
        self.b_o = span("self_attn.o_proj.bias", "self_attn.o_proj.bias") if cfg.o_proj_bias else None
        self.ln2 = span("post_attention_layernorm.weight", "post_attention_layernorm.weight")
        self.w_gu = span("mlp.gate_proj.weight", "mlp.up_proj.weight").reshape(2 * I, C)
        self.w_down = span("mlp.down_proj.weight", "mlp.down_proj.weight").reshape(C, I)
        self.start = offsets[p + "input_layernorm.weight"][0]
        self.stop = offsets[p + "mlp.down_proj.weight"][1]


class Activations:
    """Every buffer one forward/backward of a (B, T) batch needs, allocated once per shape."""

    def __init__(self, cfg: LlamaConfig, B: int, T: int, keep: bool):
        N, C, I, V, D = B * T, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
        H, KV, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
        Lk = L if keep else 1   # forward-only runs reuse one layer's worth of caches
        e = np.empty
        self.B, self.T, self.keep = B, T, keep
        self.resid = e((L + 1, N, C), F32)        # input of layer l; resid[L] feeds the final norm
        self.xmid = e((Lk, N, C), F32)            # after the attention residual
        self.ln1, self.ln2 = e((Lk, N, C), F32), e((Lk, N, C), F32)
        self.rstd1, self.rstd2 = e((Lk, N), F32), e((Lk, N), F32)
        self.q, self.k, self.v = e((Lk, B, H, T, D), F32), e((Lk, B, KV, T, D), F32), e((Lk, B, KV, T, D), F32)
        self.att = e((Lk, B, H, T, T), F32)
        self.y = e((Lk, N, H * D), F32)           # attention output in token rows (o_proj input), written in place
        self.gu = e((Lk, N, 2 * I), F32)
        self.h = e((Lk, N, I), F32)
        self.lnf, self.rstdf = e((N, C), F32), e((N,), F32)
        self.logits = e((N, V), F32)
        # scratch, shared by all layers
        self.qkv = e((N, (H + 2 * KV) * D), F32)
        self.tmp = e((N, C), F32)
        self.cos, self.sin = rope_tables(D, cfg.rope_theta, np.arange(T), cfg.rope_scaling)
        if keep:
            self.dresid = e((N, C), F32)
            self.dln = e((N, C), F32)
            self.dy = e((N, H * D), F32)
            self.dq, self.dk, self.dv = e((B, H, T, D), F32), e((B, KV, T, D), F32), e((B, KV, T, D), F32)
            self.datt = e((B, H, T, T), F32)
            self.dgu = e((N, 2 * I), F32)
            self.dh = e((N, I), F32)


class Model:
    """A Llama-family causal LM with flat parameter and gradient buffers.

    Build with `Model.from_config(cfg, seed)` or `load_model(dir)`; see
    `forward`, `forward_backward`, `zero_grad`, `save`.
    """

    def __init__(self, config: LlamaConfig, tp_group=None):
        if tp_group is not None and getattr(tp_group, "size", 1) != 1:
            raise NotImplementedError(
                f"tensor parallelism with a group of size {tp_group.size} is not implemented yet; "
                f"pass tp_group=None or a group of size 1")
        self.config = config
        self.tp_group = tp_group
        self.param_offsets: dict[str, tuple[int, int]] = {}
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        n = 0
        for name, shape in param_shapes(config):
            size = math.prod(shape)
            self.param_offsets[name] = (n, n + size)
            self.param_shapes[name] = shape
            n += size
        self.num_params = n
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

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: LlamaConfig, seed: int = 0, tp_group=None, init_std: float | None = None):
        """New model with Hugging Face's initialisation: normal(0, initializer_range) weights,
        ones for norms, zeros for biases; deterministic for a seed."""
        model = cls(config, tp_group=tp_group)
        std = init_std if init_std is not None else float(config.extra.get("initializer_range", 0.02))
        rng = np.random.default_rng(seed)
        for name, view in model.named_params.items():
            if name.endswith("norm.weight"):
                view[...] = 1.0
            elif name.endswith(".bias"):
                view[...] = 0.0
            else:
                view[...] = rng.standard_normal(view.shape, dtype=F32) * F32(std)
        return model

    def _views(self, flat):
        return {name: flat[a:b].reshape(self.param_shapes[name]) for name, (a, b) in self.param_offsets.items()}

    def _layout(self, flat):
        cfg, off = self.config, self.param_offsets
        v = self._views(flat)
        lay = {"embed": v["model.embed_tokens.weight"], "norm": v["model.norm.weight"],
               "layers": [_Layer(flat, off, cfg, i) for i in range(cfg.num_hidden_layers)]}
        lay["lm_head"] = v["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
        return lay

    def load_state_dict(self, tensors: dict, source: str = "state dict") -> None:
        """Copy named float arrays into the flat buffer; every name and shape must match the config."""
        expected = set(self.param_offsets)
        # checkpoints of tied models written by some tools still carry lm_head.weight: it must equal the embedding
        names = set(tensors)
        if self.config.tie_word_embeddings and "lm_head.weight" in names:
            if not np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
                raise ValueError(f"{source}: config.json has tie_word_embeddings=true but lm_head.weight "
                                 f"differs from model.embed_tokens.weight; set tie_word_embeddings=false")
            names.discard("lm_head.weight")
        missing = sorted(expected - names)
        unexpected = sorted(n for n in names - expected if not n.endswith("rotary_emb.inv_freq"))
        if missing:
            raise ValueError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                             f"that the config needs")
        if unexpected:
            raise ValueError(f"{source}: tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                             f"do not belong to this config (check num_hidden_layers, attention_bias, "
                             f"tie_word_embeddings)")
        for name in expected:
            arr = np.asarray(tensors[name])
            if tuple(arr.shape) != self.param_shapes[name]:
                raise ValueError(f"{source}: tensor {name} has shape {tuple(arr.shape)}, "
                                 f"the config expects {self.param_shapes[name]}")
            self.named_params[name][...] = arr

    def save(self, out_dir, max_shard_bytes=None) -> None:
        """Write config.json + model.safetensors (HF names) into out_dir."""
        from .hf_io import write_hf_dir
        write_hf_dir(out_dir, self.config.to_dict(), dict(self.named_params), max_shard_bytes=max_shard_bytes)

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
        if tr is not None and tr.B == B and tr.T == T:
            return tr
        if keep:
            self._acts_train = None   # free the old set before allocating the new one
            self._acts_train = Activations(self.config, B, T, keep=True)
            return self._acts_train
        ev = self._acts_eval
        if ev is None or ev.B != B or ev.T != T:
            self._acts_eval = None
            ev = self._acts_eval = Activations(self.config, B, T, keep=False)
        return ev

    def _forward(self, tokens, keep):
        cfg, P = self.config, self._p
        B, T = tokens.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {cfg.vocab_size})")
        a = self._activations(B, T, keep)
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        scale = 1.0 / math.sqrt(D)
        flat_tok = tokens.reshape(-1)
        embedding_forward(flat_tok, P["embed"], a.resid[0])
        for l, W in enumerate(P["layers"]):
            j = l if a.keep else 0
            x = a.resid[l]
            rmsnorm_forward(x, W.ln1, cfg.rms_norm_eps, a.ln1[j], a.rstd1[j])
            linear_forward(a.ln1[j], W.w_qkv, W.b_qkv, a.qkv)
            qkv_rope_forward(a.qkv, a.cos, a.sin, H, KV, a.q[j], a.k[j], a.v[j])
            attention_forward(a.q[j], a.k[j], a.v[j], scale, a.att[j], _heads_view(a.y[j], B, T, H))
            linear_forward(a.y[j], W.w_o, W.b_o, a.tmp)
            residual_forward(x, a.tmp, a.xmid[j])
            rmsnorm_forward(a.xmid[j], W.ln2, cfg.rms_norm_eps, a.ln2[j], a.rstd2[j])
            linear_forward(a.ln2[j], W.w_gu, None, a.gu[j])
            swiglu_forward(a.gu[j], a.h[j])
            linear_forward(a.h[j], W.w_down, None, a.tmp)
            residual_forward(a.xmid[j], a.tmp, a.resid[l + 1])
        L = cfg.num_hidden_layers
        rmsnorm_forward(a.resid[L], P["norm"], cfg.rms_norm_eps, a.lnf, a.rstdf)
        linear_forward(a.lnf, P["lm_head"], None, a.logits)
        return a

    def forward(self, tokens) -> np.ndarray:
        """tokens (B, T) ints -> logits (B, T, V) float32 (a new array)."""
        tokens = self._check_tokens(tokens)
        a = self._forward(tokens, keep=False)
        B, T = tokens.shape
        return a.logits.reshape(B, T, -1).copy()

    def loss(self, tokens, targets, ignore_index: int = -100) -> float:
        """Mean cross-entropy over non-ignored targets, forward only (for evaluation)."""
        tokens = self._check_tokens(tokens)
        targets = self._check_targets(tokens, targets)
        a = self._forward(tokens, keep=False)
        return crossentropy_forward(a.logits, targets.reshape(-1), ignore_index)

    def _check_targets(self, tokens, targets):
        targets = self._check_tokens(targets, "targets")
        if targets.shape != tokens.shape:
            raise ValueError(f"targets shape {targets.shape} differs from tokens shape {tokens.shape}")
        return targets

    # ---- backward -----------------------------------------------------------------------------

    def zero_grad(self) -> None:
        """Zero the gradient buffer. The next forward_backward then writes its gradients instead of
        adding them (one memory pass less per weight), so write nothing into grads in between."""
        self.grads.fill(0.0)
        self._grads_zero = True

    def _scratch_for(self, size):
        if self._scratch is None or self._scratch.size < size:
            self._scratch = np.empty(size, dtype=F32)
        return self._scratch

    def forward_backward(self, tokens, targets, ignore_index: int = -100, grad_scale: float = 1.0,
                         on_grad_ready=None) -> float:
        """Mean cross-entropy over non-ignored targets; ADDS grad_scale * dloss/dparams into self.grads.

        on_grad_ready(start, stop) is called as soon as grads[start:stop] are final for this call,
        last layer first; the calls cover the flat buffer exactly once.
        """
        cfg, P, G = self.config, self._p, self._g
        tokens = self._check_tokens(tokens)
        targets = self._check_targets(tokens, targets)
        a = self._forward(tokens, keep=True)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        acc = not self._grads_zero
        scratch = self._scratch_for(max(G["lm_head"].size, cfg.intermediate_size * 2 * cfg.hidden_size,
                                        G["layers"][0].w_qkv.size if G["layers"] else 0)) if acc else None
        notify = on_grad_ready or (lambda start, stop: None)

        loss = crossentropy_fused_backward(a.logits, targets.reshape(-1), ignore_index, grad_scale)
        dlogits = a.logits
        # lm_head (its gradient is the embedding's when tied; the embedding backward then adds to it)
        linear_backward(dlogits, a.lnf, P["lm_head"], a.dln, G["lm_head"], None, acc, scratch)
        a.dresid.fill(0.0)
        L = cfg.num_hidden_layers
        rmsnorm_backward(a.dln, a.resid[L], P["norm"], a.rstdf, a.dresid, G["norm"])
        norm_start = self.param_offsets["model.norm.weight"][0]
        notify(norm_start, self.num_params)

        for l in range(L - 1, -1, -1):
            W, GW = P["layers"][l], G["layers"][l]
            # MLP: resid[l+1] = xmid + down(swiglu(gate_up(ln2(xmid))))
            linear_backward(a.dresid, a.h[l], W.w_down, a.dh, GW.w_down, None, acc, scratch)
            swiglu_backward(a.dh, a.gu[l], a.dgu)
            linear_backward(a.dgu, a.ln2[l], W.w_gu, a.dln, GW.w_gu, None, acc, scratch)
            rmsnorm_backward(a.dln, a.xmid[l], W.ln2, a.rstd2[l], a.dresid, GW.ln2)
            # attention: xmid = x + o(attn(rope(qkv(ln1(x)))))
            linear_backward(a.dresid, a.y[l], W.w_o, a.dy, GW.w_o, GW.b_o, acc, scratch)
            attention_backward(_heads_view(a.dy, a.B, a.T, cfg.num_attention_heads), a.q[l], a.k[l], a.v[l],
                               a.att[l], scale, a.dq, a.dk, a.dv, a.datt)
            qkv_rope_backward(a.dq, a.dk, a.dv, a.cos, a.sin, a.qkv)
            linear_backward(a.qkv, a.ln1[l], W.w_qkv, a.dln, GW.w_qkv, GW.b_qkv, acc, scratch)
            rmsnorm_backward(a.dln, a.resid[l], W.ln1, a.rstd1[l], a.dresid, GW.ln1)
            notify(GW.start, GW.stop)

        embedding_backward(tokens.reshape(-1), a.dresid, G["embed"])
        notify(0, self.param_offsets["model.embed_tokens.weight"][1])
        self._grads_zero = False
        return loss
