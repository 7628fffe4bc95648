"""The inference forward: prefill with GEMMs, decode with GEMVs, over a preallocated KV cache.

    im = InferenceModel.from_model(model)            # views of the Model's flat buffer, no copy
    im = InferenceModel.from_model(model, quantize="q8_0")
    im = load_inference_model("dir")                 # cke_dist.model.load: HF, quantized dir or GGUF
    cache = im.new_cache(batch=2, max_len=64)
    logits = im.forward(ids, seq, pos, cache)        # rows (ids[m], cache row seq[m], position pos[m])

Rules it keeps:
- one forward for prefill and decode: a call is M token rows, each with its
  cache row and position; prefill is the prompt's T rows of one sequence (BLAS
  GEMMs), a decode step is one row per live sequence (numba GEMVs, so a step
  runs on one thread pool: see cke_kernels/decode_matvec.py). Rows of one call must have
  increasing positions within a sequence, and every earlier position of that
  sequence must already be in the cache.
- batch invariance: which kernel a row goes through depends on how many rows its
  own sequence has in the call, never on the other rows (Linear's segments), so a
  request gets the same bits alone or batched with others, quantized or not.
- the same ops as training: CORE's rmsnorm / swiglu / residual / embedding
  kernels and `linear_forward`; RoPE angles from CORE's `rope_inv_freq`.
  q/k/v and gate/up are one product each, on the Model's adjacent views.
- Q8_0 linears (`cke_kernels.q8_0`) replace float32 ones one for one, including
  the (tied) LM head; the embedding lookup then dequantizes the rows it reads.
- names, shards and heads come from cke_dist.model.layout, as in training: a
  layer is a dict of the layout's roles. With a tp group of size > 1 the
  row-parallel outputs (o_proj, down_proj) are allreduced (o_proj's bias added
  after), the embedding lookup is vocab-parallel (allreduced) and the LM head's
  vocab shards are gathered into full logits on every rank, so the TP split adds
  shards, not a second path.
- positions beyond the cache or the model's context raise, naming both numbers.
Tests: tests/integration/test_generate.py, tests/unit/test_q8_0.py.
"""
from __future__ import annotations

import numpy as np

from cke_kernels.decode_attention import cached_attention, rope_rows
from cke_kernels.embedding import embedding_forward
from cke_kernels.linear import linear_forward
from cke_kernels.decode_matvec import F32_MATVEC_MAX_ROWS, f32_matvec
from cke_kernels.q8_0 import MATVEC_MAX_ROWS
from cke_kernels.residual import residual_forward
from cke_kernels.rmsnorm import rmsnorm_forward
from cke_kernels.rope import rope_cos_sin, rope_inv_freq
from cke_kernels.swiglu import swiglu_forward

from cke_dist.formats.quant import Quant
from cke_dist.model.layout import (EMBED, NORM, Stage, attention_heads, head_name, layer_names, param_specs,
                                   split_range)
from cke_dist.parallel.tensor_parallel import TensorParallel

F32 = np.float32


class Linear:
    """y = x @ W.T (+ b), W float32 (N, K) or a Quant (Q8_0, Q4_0, Q4_1)."""

    def __init__(self, weight=None, bias=None, quant: Quant | None = None):
        if (weight is None) == (quant is None):
            raise ValueError("Linear takes a float32 weight or a quantized one, exactly one")
        self.weight, self.bias, self.quant = weight, bias, quant
        self.out_features, self.in_features = (weight if quant is None else quant).shape

    @property
    def nbytes(self) -> int:
        w = self.weight.nbytes if self.quant is None else self.quant.nbytes
        return w + (0 if self.bias is None else self.bias.nbytes)

    def quantized(self, kind: str = "q8_0") -> "Linear":
        if self.quant is not None and self.quant.kind == kind:
            return self
        w = self.weight if self.quant is None else self.quant.dequantized()
        return Linear(bias=self.bias, quant=Quant.of(w, kind))

    def __call__(self, x, out, segments=None):
        """out = x @ W.T (+ b). segments: the [start, stop) rows of each sequence in x (None: one
        sequence). A sequence with more than `gemm_rows` rows in this call (a prompt) gets a GEMM
        of its own rows; every other row goes through the row-by-row kernel. So a row's numbers
        depend on its own sequence only, never on what else is in the batch (batch invariance: a
        decode row batched with a prompt gets the bits it gets alone)."""
        limit = F32_MATVEC_MAX_ROWS if self.quant is None else MATVEC_MAX_ROWS
        if segments is None or len(segments) == 1:
            return self._product(x, out, gemm=x.shape[0] > limit)
        long = [(a, b) for a, b in segments if b - a > limit]
        if not long:
            return self._product(x, out, gemm=False)
        for a, b in long:
            self._product(x[a:b], out[a:b], gemm=True)
        short = [np.arange(a, b) for a, b in segments if b - a <= limit]
        if short:
            rows = np.concatenate(short)
            out[rows] = self._product(np.ascontiguousarray(x[rows]), np.empty((rows.size, out.shape[1]), F32),
                                      gemm=False)
        return out

    def _product(self, x, out, gemm: bool):
        if self.quant is None:
            if gemm:
                linear_forward(x, self.weight, self.bias, out)              # prefill: BLAS GEMM
                return out
            f32_matvec(self.weight, x, out)                                 # decode: one thread pool
        else:
            self.quant.matmul(x, out, integer=not gemm)
        if self.bias is not None:
            out += self.bias
        return out


def sequence_rows(seq: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal cache rows in seq: the rows of one sequence in a call."""
    cuts = np.flatnonzero(seq[1:] != seq[:-1]) + 1
    edges = [0, *cuts.tolist(), seq.size]
    return list(zip(edges[:-1], edges[1:]))


class KVCache:
    """Keys and values for `batch` sequences of up to `max_len` positions, every layer preallocated."""

    def __init__(self, n_layers, batch, n_kv, max_len, head_dim):
        shape = (n_layers, batch, n_kv, max_len, head_dim)
        self.k, self.v = _lazy_zeros(shape), _lazy_zeros(shape)
        self.lengths = np.zeros(batch, np.int64)   # positions filled per sequence
        self.batch, self.max_len = batch, max_len


def _lazy_zeros(shape) -> np.ndarray:
    """Zeros whose memory is taken 4 KiB page by page as it is written. numpy asks the kernel for 2 MiB
    huge pages on large arrays, and one (sequence, head) slab of a long cache is 2 MiB: the first
    key written into each slab zeroed all of it (a serving cache of 16 x 8192 positions zeroed
    5.7 GB during 16 prompts' prefill, 25 s here). An anonymous mmap is never madvised."""
    import mmap
    n = int(np.prod(shape)) * 4
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), F32, count=int(np.prod(shape))).reshape(shape)


def _stack(arrays, flat=None, offsets=None, names=None):
    """One (sum N, K) weight: a view of the flat buffer when the named tensors are adjacent in it
    (the Model lays q/k/v and gate/up out that way), else a stacked copy."""
    if len(arrays) == 1:
        return arrays[0]
    if flat is not None and all(n in offsets for n in names):
        spans = [offsets[n] for n in names]
        if all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)):
            view = flat[spans[0][0]:spans[-1][1]]
            return view.reshape(-1, arrays[0].shape[1]) if arrays[0].ndim == 2 else view
    return np.ascontiguousarray(np.concatenate(arrays, axis=0), dtype=F32)


class InferenceModel:
    """The decoder for generation: float32 views of a Model (or Q8_0 linears) plus KV-cache forward."""

    def __init__(self, config, tensors: dict, tp_group=None, flat=None, offsets=None, stage=None):
        """config: a LlamaConfig. tensors: HF name -> this rank's shard (cke_dist.model.layout's cut
        for the group's size and rank, of its pipeline `stage`: layers [l0, l1), the embedding on the
        first stage, norm and head on the last) as a float32 array, or for Q8_0 weights (qs, scales).
        With the Model's flat buffer and offsets, q/k/v and gate/up become single views of it (no
        copy). Each layer is a dict of layout roles (ln1, qkv, o, ln2, gate_up, down)."""
        self.config = cfg = config
        self.stage = stage = stage or Stage.whole(cfg)
        self.tp = TensorParallel.of(tp_group)
        self.tp_size, tp_rank = self.tp.size, self.tp.rank
        self.heads = attention_heads(cfg, self.tp_size, tp_rank)
        self.vocab_range = split_range(cfg.vocab_size, self.tp_size, tp_rank)
        self.head_dim = cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        shapes = {s.name: s.shape for s in param_specs(cfg, self.tp_size, tp_rank, stage)}

        def get(name):
            if name not in tensors:
                raise ValueError(f"missing tensor {name} that the config needs")
            t = tensors[name]
            if isinstance(t, tuple):          # (qs, scales): a Q8_0 pair
                t = Quant("q8_0", *t)
            shape = tuple(t.shape)
            if shape != shapes[name]:
                raise ValueError(f"tensor {name} has shape {shape}; this rank's shard of it should be "
                                 f"{shapes[name]}")
            return t

        def lin(names, bias_names=()):
            ws = [get(n) for n in names]
            bs = [get(n) for n in bias_names]
            bias = _stack(bs, flat, offsets, bias_names) if bs else None
            if any(isinstance(w, Quant) for w in ws):
                kinds = {w.kind for w in ws if isinstance(w, Quant)}
                if len(kinds) > 1 or not all(isinstance(w, Quant) for w in ws):
                    # one fused product needs one format: the parts' mix (a GGUF may mix them) as Q8_0
                    ws = [Quant.of(w.dequantized() if isinstance(w, Quant) else w, "q8_0") for w in ws]
                return Linear(bias=bias, quant=Quant.stack(ws))
            return Linear(_stack(ws, flat, offsets, names), bias)

        self.layers = []
        for i in range(stage.l0, stage.l1):
            n = layer_names(cfg, i)
            # o_proj's bias is added after the allreduce of the row-parallel partial sums (see forward)
            self.layers.append({"ln1": get(n["ln1"][0]), "qkv": lin(n["qkv"], n["qkv_bias"]), "o": lin(n["o"]),
                                "o_bias": get(n["o_bias"][0]) if n["o_bias"] else None,
                                "ln2": get(n["ln2"][0]), "gate_up": lin(n["gate_up"]), "down": lin(n["down"])})
        self.norm = get(NORM) if stage.last else None
        self.lm_head = lin([head_name(cfg)]) if stage.last else None
        embed = get(EMBED) if stage.first else None
        if embed is None:
            self.embed_q, self.embed = None, None
        elif cfg.tie_word_embeddings and self.lm_head is not None and self.lm_head.quant is not None:
            self.embed_q, self.embed = self.lm_head.quant, None     # one quantized table serves both
        elif isinstance(embed, Quant):
            self.embed_q, self.embed = embed, None
        else:
            self.embed_q, self.embed = None, embed
        down = self.layers[0]["down"].quant if self.layers else None
        self.quantize = None if down is None else down.kind
        self._ws: dict[int, dict] = {}
        # the query heads' KV head on this rank (a tp rank whose heads cut GQA groups: per segment)
        self.kv_head = np.concatenate([k0 + (np.arange(q1 - q0) * (k1 - k0)) // (q1 - q0)
                                       for q0, q1, k0, k1 in self.heads.segments()]).astype(np.int64)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model, quantize: str | None = None) -> "InferenceModel":
        """Views of a cke_dist Model's parameters (no copy for float32); quantize="q8_0" for a Q8_0 copy."""
        if quantize not in (None, *Quant.KINDS):
            raise ValueError(f"quantize={quantize!r}: supported are None (float32), {', '.join(Quant.KINDS)}")
        im = cls(model.config, model.named_params, model.tp,
                 flat=model.params, offsets=model.param_offsets, stage=getattr(model, "stage", None))
        return im.to_quantized(quantize) if quantize else im

    def to_quantized(self, kind: str) -> "InferenceModel":
        """A copy with every linear, the LM head and the embedding table quantized to `kind`
        (q8_0, q4_0, q4_1: the tensors a quantized directory stores); norms and biases shared."""
        import copy
        if self.quantize == kind:
            return self
        q = copy.copy(self)
        q.layers = [{role: (w.quantized(kind) if isinstance(w, Linear) else w) for role, w in layer.items()}
                    for layer in self.layers]
        q.lm_head = self.lm_head.quantized(kind) if self.lm_head is not None else None
        q.embed = None
        if self.embed is None and self.embed_q is None:
            q.embed_q = None
        elif self.config.tie_word_embeddings and q.lm_head is not None:
            q.embed_q = q.lm_head.quant                  # one table serves both
        else:
            q.embed_q = Quant.of(self.embed if self.embed is not None else self.embed_q.dequantized(), kind)
        q.quantize, q._ws = kind, {}
        return q

    # ---- sizes ----------------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (every linear, the LM head, norms; one embedding row)."""
        n = sum(w.nbytes for layer in self.layers for w in layer.values() if w is not None)
        return n + (self.lm_head.nbytes + self.norm.nbytes if self.stage.last else 0)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.max_context:
            raise ValueError(f"KV cache of {max_len} positions exceeds the model's context "
                             f"(max_position_embeddings={self.max_context} in config.json)")
        return KVCache(len(self.layers), batch, self.heads.n_kv, max_len, self.head_dim)

    # ---- forward --------------------------------------------------------------------------------

    def _workspace(self, M):
        ws = self._ws.get(M)
        if ws is None:
            C, D = self.config.hidden_size, self.head_dim
            l0 = self.layers[0]
            e = np.empty
            ws = dict(x=e((M, C), F32), x2=e((M, C), F32), xn=e((M, C), F32), rstd=e((M,), F32),
                      qkv=e((M, l0["qkv"].out_features), F32), att=e((M, self.heads.n_q, D), F32),
                      q=e((M, self.heads.n_q, D), F32), k=e((M, self.heads.n_kv, D), F32),
                      v=e((M, self.heads.n_kv, D), F32),
                      tmp=e((M, C), F32), gu=e((M, l0["gate_up"].out_features), F32),
                      h=e((M, l0["gate_up"].out_features // 2), F32))
            if M <= 16:   # decode shapes recur every step; prefill shapes are one-offs
                self._ws[M] = ws
        return ws

    def forward(self, ids, seq, pos, cache: KVCache, logits_rows=None) -> np.ndarray:
        """ids, seq, pos (M,) ints -> logits (len(logits_rows), V) (all M rows by default).

        Writes each row's key/value into cache row seq[m] at position pos[m] and sets
        cache.lengths[seq[m]] = pos[m] + 1. The whole model: a pipeline stage runs stage_forward."""
        return self.stage_forward(ids, seq, pos, cache, logits_rows)

    def stage_forward(self, inp, seq, pos, cache: KVCache, logits_rows=None, pool=()):
        """This stage's part of forward: token ids (M,) in on the first stage, else the previous
        stage's hidden states (M, C); logits out on the last stage, else hidden states (M, C) for the
        next one (a workspace view: send it before the next call). pool: [start, stop) row ranges
        whose final-normed hidden states the last stage also averages: it then returns (logits,
        pooled (len(pool), C)) (embeddings: the mean of what HF calls last_hidden_state)."""
        seq = np.ascontiguousarray(seq, dtype=np.int64).reshape(-1)
        pos = np.ascontiguousarray(pos, dtype=np.int64).reshape(-1)
        M = seq.size
        if not (pos.size == M and M > 0):
            raise ValueError(f"seq and pos must be the same non-zero length, got {seq.size}, {pos.size}")
        if seq.min() < 0 or seq.max() >= cache.batch:
            raise ValueError(f"cache row {int(seq.max())} outside the cache's batch of {cache.batch}")
        if pos.min() < 0 or pos.max() >= cache.max_len:
            raise ValueError(f"position {int(pos.max())} is beyond the KV cache ({cache.max_len} positions; "
                             f"the model's context is {self.max_context})")
        if np.any(pos > cache.lengths[seq] + np.arange(M)):   # cheap guard against holes in the cache
            raise ValueError("positions must continue each sequence's cache without gaps")
        ws = self._workspace(M)
        x = ws["x"]
        if self.stage.first:
            ids = np.ascontiguousarray(inp, dtype=np.int64).reshape(-1)
            V = self.config.vocab_size
            if ids.size != M:
                raise ValueError(f"ids, seq, pos must be the same length, got {ids.size}, {M}, {M}")
            if ids.min() < 0 or ids.max() >= V:
                bad = int(ids.min() if ids.min() < 0 else ids.max())
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {V})")
            self._embed(ids, x)
        else:
            x[...] = inp
        self._layers(x, seq, pos, cache, ws, sequence_rows(seq))
        np.maximum.at(cache.lengths, seq, pos + 1)
        if not self.stage.last:
            return x
        rows = np.arange(M) if logits_rows is None else np.asarray(logits_rows, dtype=np.int64)
        if rows.size:
            xf = np.ascontiguousarray(x[rows])
            xfn = np.empty_like(xf)
            rmsnorm_forward(xf, self.norm, self.eps, xfn, np.empty(xf.shape[0], F32))
            local = self.lm_head(xfn, np.empty((xf.shape[0], self.lm_head.out_features), F32),
                                 sequence_rows(seq[rows]))
            logits = self.tp.gather_vocab(local, self.config.vocab_size) if self.tp_size > 1 else local
        else:      # a tick of embeddings only: every tp rank skips the head alike
            logits = np.empty((0, self.config.vocab_size), F32)
        if not len(pool):
            return logits
        pooled = np.empty((len(pool), x.shape[1]), F32)
        for i, (a, b) in enumerate(pool):
            xn = np.empty((b - a, x.shape[1]), F32)
            rmsnorm_forward(np.ascontiguousarray(x[a:b]), self.norm, self.eps, xn, np.empty(b - a, F32))
            pooled[i] = xn.mean(axis=0, dtype=np.float64)
        return logits, pooled

    def _layers(self, x, seq, pos, cache, ws, segments):
        M = x.shape[0]
        D, H, KV = self.head_dim, self.heads.n_q, self.heads.n_kv
        cos, sin = rope_cos_sin(pos, self.inv_freq)       # once a forward, for every layer
        x2, xn = ws["x2"], ws["xn"]
        for li, L in enumerate(self.layers):
            rmsnorm_forward(x, L["ln1"], self.eps, xn, ws["rstd"])
            qkv = L["qkv"](xn, ws["qkv"], segments)
            q, k, v = ws["q"], ws["k"], ws["v"]
            q[...] = qkv[:, :H * D].reshape(M, H, D)
            k[...] = qkv[:, H * D:(H + KV) * D].reshape(M, KV, D)
            v[...] = qkv[:, (H + KV) * D:].reshape(M, KV, D)
            rope_rows(q, cos, sin)
            rope_rows(k, cos, sin)
            cache.k[li][seq, :, pos, :] = k
            cache.v[li][seq, :, pos, :] = v
            att = cached_attention(q, cache.k[li], cache.v[li], seq, pos, self.kv_head, ws["att"])
            self.tp.allreduce(L["o"](att.reshape(M, H * D), ws["tmp"], segments))
            if L["o_bias"] is not None:
                ws["tmp"] += L["o_bias"]
            residual_forward(x, ws["tmp"], x2)
            rmsnorm_forward(x2, L["ln2"], self.eps, xn, ws["rstd"])
            swiglu_forward(L["gate_up"](xn, ws["gu"], segments), ws["h"])
            self.tp.allreduce(L["down"](ws["h"], ws["tmp"], segments))
            residual_forward(x2, ws["tmp"], x)

    def _embed(self, ids, x):
        """Vocab-parallel lookup: rows of this rank's vocabulary shard, zeros elsewhere, summed over tp."""
        v0, v1 = self.vocab_range
        if self.embed is not None:
            embedding_forward(ids, self.embed, x, v0)
        else:
            local = ids - v0
            mine = (local >= 0) & (local < v1 - v0)
            if mine.all():
                self.embed_q.gather_rows(local, x)
            else:
                x.fill(0.0)
                if mine.any():
                    x[mine] = self.embed_q.gather_rows(local[mine], np.empty((int(mine.sum()), x.shape[1]), F32))
        self.tp.allreduce(x)

    def prefill(self, cache: KVCache, row: int, ids, start: int = 0, all_logits: bool = False) -> np.ndarray:
        """Feed a prompt (or its continuation from `start`) into cache row `row`; logits of its last
        token (V,), or of every token (T, V) with all_logits."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        T = ids.size
        if T == 0:
            raise ValueError("prefill needs at least one token")
        if start + T > cache.max_len:
            raise ValueError(f"prompt of {T} tokens from position {start} does not fit the KV cache of "
                             f"{cache.max_len} positions (the model's context is {self.max_context})")
        out = self.forward(ids, np.full(T, row), np.arange(start, start + T), cache,
                           logits_rows=None if all_logits else [T - 1])
        return out if all_logits else out[0]

    def decode(self, cache: KVCache, rows, ids) -> np.ndarray:
        """One new token per cache row in `rows`, at each row's next position -> logits (len(rows), V)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return self.forward(ids, rows, cache.lengths[rows], cache)
