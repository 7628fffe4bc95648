"""GGUF files (llama.cpp's format) in: config, tensors under HF names, tokenizer, chat template.

    cfg = gguf_config("model.gguf")                 # an HF config dict (llama or qwen2)
    src = GGUFTensors("model.gguf", cfg)            # .read(hf_name, index): float32, as load_model reads
    tok = gguf_tokenizer("model.gguf")              # cke_dist.formats.tokenizer.HFTokenizer built from metadata

Rules this module keeps:
- The file is read with the `gguf` package (llama.cpp's own reader) and dequantized by it, so a
  tensor comes back as float32 exactly as llama.cpp's reference dequantization gives it. Types:
  F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K; any other is an error naming the tensor and
  its type. Architectures: llama (SmolLM, Llama 2/3, Mistral-style) and qwen2.
- llama.cpp's converter permutes the rows of q and k of the llama architecture for its RoPE
  layout; reading undoes it (qwen2 files are not permuted).
- The tokenizer is rebuilt from the metadata with the `tokenizers` library the way transformers
  builds it from the same file: byte-level BPE of `tokenizer.ggml.model = gpt2` (its split regex
  from `tokenizer.ggml.pre`) and SentencePiece BPE of `llama` (Llama 2, Mistral, TinyLlama: merges
  recovered from the scores, `▁` for spaces, <0xXX> byte pieces), control tokens and the named
  BOS/EOS/UNK/PAD as specials: ids and decoded text equal transformers' on the same file
  (tests/test_gguf.py). Two departures, both toward SentencePiece and llama.cpp: a file with
  `tokenizer.ggml.add_space_prefix = false` gets no leading "▁" (transformers ignores the key),
  and a character with neither a piece nor byte pieces is <unk> (transformers drops it). Like
  transformers, and unlike llama.cpp, text that starts with spaces or follows a special token
  gets no extra "▁" prefixed.
- RoPE scaling is read as llama.cpp applies it: `rope.scaling.type` linear (also a factor without
  a type) and Llama 3.x's per-frequency divisors (`rope_freqs.weight`), both mapped to our Llama 3
  parameters (linear = every frequency past the low cut); yarn and other types, and divisors that
  no Llama 3 parameters give, are errors. transformers' GGUF loader ignores both (it runs such
  files unscaled), so there the reference is llama.cpp and transformers' own RoPE on the config.
  Export writes Llama 3 scaling as llama.cpp's converter does (rope_freqs.weight, plus the
  original context length), linear as `rope.scaling.type = linear`.
Tests: tests/test_gguf.py.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from cke_dist.formats.architectures import ARCHITECTURES, EMBED, LM_HEAD, NORM
from cke_dist.formats.hf import fsync_path
from cke_dist.formats.quant import Quant

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# HF role of each per-layer GGUF tensor (blk.N.<key>.weight / .bias)
_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GLOBAL = {"token_embd.weight": EMBED, "output_norm.weight": NORM, "output.weight": LM_HEAD}

# The split regexes of the byte-level vocabularies whose `tokenizer.ggml.pre` names them (the
# pre-tokenizers of Llama 3's and Qwen2's tokenizer.json); any other name splits as GPT-2 does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {**dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"], _LLAMA3_SPLIT),
           **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _QWEN2_SPLIT)}
_UNSUPPORTED_SPLITS = {"tekken", "gpt-4o", "llama4", "qwen35", "minimax-m2"}


class GGUFError(ValueError):
    """A GGUF file this reader cannot turn into a model (the message names what and why)."""


def is_gguf(path) -> bool:
    p = Path(path)
    return p.suffix.lower() == ".gguf" and p.is_file()


def _reader(path):
    p = Path(path).resolve()
    return _cached_reader(str(p), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int):
    """One parse per file (the metadata of a large vocabulary takes seconds to read) for the
    config, the tensors and the tokenizer alike."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError(f"{path}: reading GGUF needs the `gguf` package: pip install 'cke-dist[gguf]'") from e
    try:
        return GGUFReader(str(path))
    except Exception as e:   # the reader raises several kinds on a damaged file
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(path, reader=None) -> dict:
    """The HF config.json dict the file's metadata describes."""
    r = reader or _reader(path)
    arch = _field(r, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")

    def need(key):
        v = _field(r, f"{arch}.{key}")
        if v is None:
            raise GGUFError(f"{path}: metadata {arch}.{key} is missing")
        return v
    names = {t.name for t in r.tensors}
    heads = int(need("attention.head_count"))
    tokens = _field(r, "tokenizer.ggml.tokens")
    vocab = _field(r, f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = next(t.shape for t in r.tensors if t.name == "token_embd.weight")[-1]
    cfg = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "vocab_size": int(vocab), "hidden_size": int(need("embedding_length")),
        "intermediate_size": int(need("feed_forward_length")), "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(r, f"{arch}.attention.head_count_kv", heads)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(r, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    key_len = _field(r, f"{arch}.attention.key_length")
    if key_len is not None and int(key_len) != cfg["hidden_size"] // heads:
        cfg["head_dim"] = int(key_len)
    scaling = _rope_scaling(path, r, arch, int(key_len or cfg["hidden_size"] // heads), cfg["rope_theta"])
    if scaling is not None:
        cfg["rope_scaling"] = {"rope_type": "llama3", **scaling}
    for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        v = _field(r, name)
        if v is not None:
            cfg[key] = int(v)
    return cfg


# llama.cpp's converter computes Llama 3 factors with these when the HF config does not say
_LLAMA3_ORIGINAL_CONTEXT = 8192


def _rope_scaling(path, r, arch: str, head_dim: int, theta: float) -> dict | None:
    """The RoPE scaling llama.cpp applies to this file, as our Llama 3 parameters (None: none).

    llama.cpp divides frequency i by rope_freqs.weight[i] (the llama architecture; its converter
    writes Llama 3.x scaling so) and all of them by `rope.scaling.factor` when the scaling type is
    linear -- the type it assumes when the file names none. The divisors are matched to Llama 3
    parameters (which transformers and our kernels compute): the usual ones (low 1, high 4), or
    ones solved from the blended band, checked against every divisor. Pure linear scaling is
    Llama 3 scaling with every wavelength past the low-frequency cut (original context 1, low 1,
    high 2): each frequency is divided by the factor, as transformers' linear RoPE does.
    transformers' GGUF reader ignores both (it runs such files unscaled), so llama.cpp is the
    reference here."""
    kind = _field(r, f"{arch}.rope.scaling.type", "linear")
    scale = float(_field(r, f"{arch}.rope.scaling.factor", _field(r, f"{arch}.rope.scale_linear", 0.0)))
    linear = scale if kind == "linear" and scale not in (0.0, 1.0) else 1.0
    if kind not in ("none", "linear") and scale not in (0.0, 1.0):
        raise GGUFError(f"{path}: {arch}.rope.scaling.type = {kind!r} (factor {scale}) is not supported; RoPE "
                        f"scaling read from GGUF: linear and Llama 3's (rope_freqs.weight)")
    inv = 1.0 / float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = next((t for t in r.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        div = np.full(inv.shape, linear)
    else:
        from gguf.quants import dequantize
        if arch != "llama":
            raise GGUFError(f"{path}: rope_freqs.weight in a {arch} file: llama.cpp applies it to llama only")
        div = np.asarray(dequantize(freqs.data, freqs.tensor_type), np.float64).reshape(-1) * linear
        if div.shape != inv.shape or not (div > 0).all():
            raise GGUFError(f"{path}: rope_freqs.weight has {div.size} values; head_dim {head_dim} needs "
                            f"{inv.size} positive RoPE frequency divisors")
    if np.allclose(div, 1.0, rtol=1e-6, atol=0):
        return None
    factor = _f32(div.max())
    known = _field(r, f"{arch}.rope.scaling.original_context_length")
    old = int(known) if known is not None else _LLAMA3_ORIGINAL_CONTEXT
    tries = [dict(factor=factor, low_freq_factor=1.0, high_freq_factor=2.0, original_max_position_embeddings=1)
             if np.allclose(div, factor, rtol=1e-6, atol=0) else
             dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=old)]
    tries += _llama3_fits(div, inv, factor, old if known is not None else None)
    for p in tries:
        # llama.cpp's converter computes the divisors in float32: within 3e-7 of the exact ones
        if 0 < p["low_freq_factor"] < p["high_freq_factor"] and np.allclose(llama3_divisors(inv, **p), div,
                                                                              rtol=1e-6, atol=0):
            return p
    raise GGUFError(f"{path}: RoPE frequency divisors {np.round(div, 4).tolist()} (rope_freqs.weight x linear "
                    f"factor {linear}) are not Llama 3 scaling for any parameters we could find; this RoPE "
                    f"scaling cannot be represented")


def _llama3_fits(div, inv, factor: float, old: int | None) -> list[dict]:
    """Llama 3 parameters that may give these divisors (the caller checks them). In the blended band
    1/div = (1-s)/factor + s with s = (old/wavelength - low) / (high - low). With old known that is
    linear in low and high. Only old/low and old/high matter, so without it low = 1 (as in every
    Llama 3.x) and s*high - old/wavelength = s - 1 is linear in high and old. A band of one
    frequency or none leaves a range of equivalent parameters: one inside it is taken."""
    if factor <= 1:
        return []
    band = (div > 1 + 1e-6) & (div < factor * (1 - 1e-6))
    s = (1 / div[band] - 1 / factor) / (1 - 1 / factor)
    u = inv / (2 * np.pi)                                   # 1 / wavelength
    if band.sum() >= 2:
        # the divisors are float32: the plain numbers a config spells are tried first
        if old is not None:
            (low, high), *_ = np.linalg.lstsq(np.stack([1 - s, s], 1), old * u[band], rcond=None)
            fits = [(float(f"{low:.{d}g}"), float(f"{high:.{d}g}"), old) for d in (3, 4, 6, 12)]
        else:
            (high, ctx), *_ = np.linalg.lstsq(np.stack([s, -u[band]], 1), s - 1, rcond=None)
            fits = [(1.0, float(f"{high:.{d}g}"), c) for c in (int(round(ctx)), float(f"{ctx:.12g}"))
                    for d in (3, 4, 6, 12)]
    else:
        # low = 1: old/wavelength < 1 where scaled whole, > high where untouched, 1 + s (high - 1) in the band
        u_kept = u[div <= 1 + 1e-6].min(initial=np.inf)
        u_scaled = u[div >= factor * (1 - 1e-6)].max(initial=0.0)
        if not band.any():
            if not (np.isfinite(u_kept) and u_scaled > 0):     # all kept or all scaled: tried before
                return []
            ctx = 1 / np.sqrt(u_kept * u_scaled)
            fits = [(1.0, float(np.sqrt(ctx * u_kept)), float(ctx))]
        else:                     # old/wavelength = 1 + eps in the band, eps small enough for both cuts
            ub, sb = u[band][0], s[0]
            eps = min(ub / u_scaled - 1 if u_scaled > 0 else 1.0, (u_kept / ub - 1) * sb) / 2
            fits = [(1.0, float(1 + eps / sb), float((1 + eps) / ub))]
    return [dict(factor=factor, low_freq_factor=lo, high_freq_factor=hi, original_max_position_embeddings=c)
            for lo, hi, c in fits]


def llama3_divisors(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """What Llama 3 scaling divides each inverse frequency by (llama.cpp's rope_freqs.weight, as its
    converter computes it): 1 above the high-frequency cut, `factor` below the low one, blended
    between."""
    wavelen = 2 * np.pi / np.asarray(inv_freq, np.float64)
    old = float(original_max_position_embeddings)
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    return np.where(wavelen < old / high_freq_factor, 1.0,
                    np.where(wavelen > old / low_freq_factor, factor, 1 / ((1 - smooth) / factor + smooth)))


def _f32(v) -> float:
    """GGUF stores these as float32: the shortest decimal that is that float32 (1e-05, not
    9.999999747378752e-06), as the HF config the file was converted from spelled it."""
    return float(str(np.float32(v)))


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a GGUF tensor name (None: not a weight we load)."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    return None


class GGUFTensors:
    """HF name -> float32 tensors of a GGUF file, as `open_hf_tensors` gives them for a directory
    (read(name, index), shape(name)); each read dequantizes that whole tensor, then cuts."""

    def __init__(self, path, config: dict, reader=None):
        self.path = Path(path)
        self.reader = reader or _reader(path)
        self.config = config
        self.arch = config["model_type"]
        self._tensors = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise GGUFError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}; supported: "
                                f"{', '.join(SUPPORTED_TYPES)} (requantize with llama.cpp's llama-quantize)")
            self._tensors[name] = t

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def __iter__(self):
        return iter(self._tensors)

    def shape(self, name) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape.tolist()))   # GGUF lists dims fastest-first

    def read(self, name, index=()) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self.shape(name))
        if self.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = self.config["num_attention_heads"] if ".q_proj." in name else self.config["num_key_value_heads"]
            w = _unpermute(w, heads)
        return np.ascontiguousarray(w[index])


    def read_native(self, name, spec):
        """This rank's slice (spec: a layout ParamSpec) in the file's own format where a kernel of
        ours reads it: Q8_0, Q4_0, Q4_1 kept as stored (a decode.Quant, blocks repacked, never
        requantized); Q4_K and Q5_K requantized to Q4_1, Q6_K to Q8_0 (the nearest kernels we
        have); float types as float32."""
        from gguf.quants import dequantize

        t = self._tensors[name]
        kind = t.tensor_type.name
        full = self.shape(name)
        if len(full) != 2 or kind in ("F32", "F16", "BF16"):
            return self.read(name, spec.index)
        if kind in ("Q4_K", "Q5_K", "Q6_K"):
            return Quant.of(self.read(name, spec.index), "q8_0" if kind == "Q6_K" else "q4_1")
        rows, nb = full[0], full[1] // 32
        blocks = np.asarray(t.data).reshape(rows, nb, -1)
        f16 = lambda a, b: np.ascontiguousarray(blocks[..., a:b]).view(np.float16)[..., 0].astype(np.float32)  # noqa: E731
        if kind == "Q8_0":
            q, d, m = np.ascontiguousarray(blocks[..., 2:34]).view(np.int8).reshape(rows, -1), f16(0, 2), None
        elif kind == "Q4_0":
            q, d, m = blocks[..., 2:18].reshape(rows, -1), f16(0, 2), None
        elif kind == "Q4_1":
            q, d, m = blocks[..., 4:20].reshape(rows, -1), f16(0, 2), f16(2, 4)
        else:
            return Quant.of(np.asarray(dequantize(t.data, t.tensor_type), np.float32)[spec.index], "q8_0")
        if self.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = self.config["num_attention_heads"] if ".q_proj." in name else self.config["num_key_value_heads"]
            q, d = _unpermute(q, heads), _unpermute(d, heads)
            m = None if m is None else _unpermute(m, heads)
        per = 1 if kind == "Q8_0" else 2           # values per stored byte
        if spec.dim == 1:
            if spec.start % 32 or spec.stop % 32:
                raise GGUFError(f"{self.path}: {name} is cut at columns {spec.start}:{spec.stop} for tensor "
                                f"parallelism, not on its 32-value blocks; choose another tp")
            qi = (slice(None), slice(spec.start // per, spec.stop // per))
            di = (slice(None), slice(spec.start // 32, spec.stop // 32))
        else:
            qi = di = spec.index
        cut = lambda a: None if a is None else np.ascontiguousarray(a[di])   # noqa: E731
        return Quant(kind.lower(), np.ascontiguousarray(q[qi]), cut(d), cut(m))


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's q/k row order: within each head llama.cpp stores the rotary pairs
    interleaved (row 2i, 2i+1), HF stores the two halves (row i, i + d/2)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_chat_template(path, reader=None) -> str | None:
    return _field(reader or _reader(path), "tokenizer.chat_template")


def gguf_special_tokens(path, reader=None) -> dict[str, str]:
    """bos_token / eos_token (/ unk, pad) texts, the variables a chat template may use."""
    r = reader or _reader(path)
    tokens = _field(r, "tokenizer.ggml.tokens") or []
    out = {}
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        i = _field(r, f"tokenizer.ggml.{name}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            out[f"{key}_token"] = tokens[int(i)]
    return out


def gguf_tokenizer(path, reader=None):
    """(a `tokenizers.Tokenizer`, its end-of-sequence ids, its BOS id or None) rebuilt from the file's
    tokenizer metadata: byte-level BPE (`tokenizer.ggml.model = gpt2`) or SentencePiece BPE (`llama`).
    cke_dist.formats.tokenizer.load_tokenizer wraps it as an HFTokenizer."""
    r = reader or _reader(path)
    kind = _field(r, "tokenizer.ggml.model")
    tokens = _field(r, "tokenizer.ggml.tokens")
    if kind in ("gpt2", "llama") and not tokens:
        raise GGUFError(f"{path}: tokenizer.ggml.model = {kind!r} but tokenizer.ggml.tokens is missing or empty")
    if kind == "gpt2":
        tok = _byte_level_bpe(path, r, list(tokens))
    elif kind == "llama":
        tok = _sentencepiece_bpe(path, r, list(tokens))
    else:
        raise GGUFError(f"{path}: tokenizer.ggml.model = {kind!r}; rebuilt from GGUF: 'gpt2' (byte-level BPE: "
                        f"Llama 3, Qwen2, SmolLM) and 'llama' (SentencePiece BPE: Llama 2, Mistral, TinyLlama)")
    eos = _field(r, "tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    eot = _field(r, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    bos = _field(r, "tokenizer.ggml.bos_token_id")
    return tok, eos_ids, None if bos is None else int(bos)


def _byte_level_bpe(path, r, tokens: list[str]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    pre = _field(r, "tokenizer.ggml.pre", "default")
    if pre in _UNSUPPORTED_SPLITS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre = {pre!r} is not supported")
    types = list(_field(r, "tokenizer.ggml.token_type", []))
    merges = [tuple(m.split(" ")) for m in _field(r, "tokenizer.ggml.merges", [])]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # a token outside the byte alphabet (a special written as text) is spelled through it, as
    # transformers does, so the vocabulary keeps its size and ids
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [m for m in merges if len(m) == 2 and m[0] + m[1] in vocab]    # a merge to no token never applies
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    split = _SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) are specials matched whole; user-defined ones (4) plain added tokens
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                            if k == 3 and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                    if k == 4 and t in vocab])
    return tok


def _sentencepiece_bpe(path, r, tokens: list[str]):
    """SentencePiece BPE (Llama 2, Mistral, TinyLlama) as transformers rebuilds it from GGUF: BPE over
    the pieces with merges recovered from the scores (a GGUF stores none), `▁` for spaces, pieces
    <0x00>..<0xFF> for characters the vocabulary lacks."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    scores = _field(r, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise GGUFError(f"{path}: a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token "
                        f"({len(tokens)}); got {'none' if scores is None else len(scores)}")
    types = list(_field(r, "tokenizer.ggml.token_type", []))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _field(r, "tokenizer.ggml.merges")
    merges = [tuple(m.split(" ")) for m in merges] if merges else _spm_merges(vocab, dict(zip(tokens, scores)))
    unk = _field(r, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk)] if unk is not None and 0 <= int(unk) < len(tokens) else None
    # a character with neither a piece nor byte pieces becomes <unk>, as in SentencePiece and
    # llama.cpp (transformers' rebuild drops it from the text instead); with byte pieces, as in every
    # Llama 2 / Mistral vocabulary, the byte fallback always wins and the two agree
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # llama.cpp prefixes a space unless the file says not to (tokenizer.ggml.add_space_prefix,
    # written from tokenizer_config's add_prefix_space); transformers' GGUF reader ignores the key
    # and always prefixes, so ids differ from it only on a file that sets it false
    prefix = bool(_field(r, "tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)
    # specials matched whole in text: control tokens (type 3) and the ones the file names
    named = {_field(r, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")} - {None}
    special = {i for i, k in enumerate(types) if k == 3} | {int(i) for i in named if 0 <= int(i) < len(tokens)}
    tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in sorted(special)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for i, (t, k) in enumerate(zip(tokens, types))
                    if k == 4 and i not in special])
    return tok


def _spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a piece into two pieces,
    ranked by the piece's score (higher first; ties: the longer left piece, then the longer right
    one, then the order of the pieces) -- exactly transformers' generate_merges order, since with
    tied scores (bytes, controls) the order decides which pair merges first."""
    found = []
    for piece, score in scores.items():
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found += [(a, b, score) for a, b in pairs]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes that print stand for themselves; the others
    are shifted past 255), the alphabet byte-level BPE vocabularies are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


# ---- out ---------------------------------------------------------------------------------------------

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}      # llama.cpp's LLAMA_FTYPE_* of a whole file


def gguf_name(hf: str) -> str:
    """The GGUF tensor name of an HF one (the inverse of hf_name)."""
    for g, h in _GLOBAL.items():
        if h == hf:
            return g
    p = hf.split(".")
    role = ".".join(p[3:-1])
    key = next(k for k, v in _LAYER.items() if v == role)
    return f"blk.{p[2]}.{key}.{p[-1]}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k row order for llama (the inverse of _unpermute)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, config, tensors: dict[str, np.ndarray], kind: str = "f32", tokenizer=None,
               chat_template: str | None = None) -> Path:
    """Write a GGUF file of a llama / qwen2 model: config (a LlamaConfig), its full float32 tensors
    under HF names, 2-D weights stored as `kind` (f32, f16, q8_0, q4_0; norms and biases stay f32, as
    llama.cpp stores them), the tokenizer (an HFTokenizer over byte-level BPE, or our byte tokenizer)
    as GGUF metadata, Llama 3 RoPE scaling as rope_freqs.weight (llama only: llama.cpp applies it to
    no other architecture), or as linear scaling where it divides every frequency alike. Written
    beside the target and renamed, so it is never half there."""
    import gguf
    from gguf.quants import quantize

    if kind not in GGUF_TYPES:
        raise ValueError(f"GGUF type {kind!r}: one of {', '.join(GGUF_TYPES)}")
    arch = config.model_type
    if arch not in ARCHITECTURES:
        raise ValueError(f"model_type {arch!r}: GGUF export supports {sorted(ARCHITECTURES)}")
    divisors = None
    if config.rope_scaling:
        inv = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim)
        divisors = llama3_divisors(inv, **config.rope_scaling).astype(np.float32)
        linear = bool(np.all(divisors == divisors[0]))
        if np.all(divisors == 1):          # parameters that scale no frequency of this head_dim
            divisors = None
        if arch != "llama" and not linear:
            raise ValueError(f"Llama 3 RoPE scaling in a {arch} model: llama.cpp applies per-frequency RoPE "
                             f"factors (rope_freqs.weight) to the llama architecture only")
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(path.stem)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    if divisors is not None and linear:
        # every frequency divided alike: llama.cpp's (and every reader's) linear scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(divisors[0]))
    elif divisors is not None:
        # as llama.cpp's converter writes Llama 3.x; the original context lets our reader give back
        # the config's own parameters, not just equivalent ones
        w.add_rope_scaling_orig_ctx_len(int(config.rope_scaling["original_max_position_embeddings"]))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(_FILE_TYPE[kind])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(w, tokenizer, config.vocab_size)    # llama.cpp refuses a file without one
    if chat_template:
        w.add_chat_template(chat_template)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    if divisors is not None and not linear:
        w.add_tensor("rope_freqs.weight", divisors)
    for name, t in tensors.items():
        if name == LM_HEAD and config.tie_word_embeddings:
            continue
        t = np.ascontiguousarray(t, dtype=np.float32)
        if arch == "llama" and (".q_proj.weight" in name or ".k_proj.weight" in name):
            t = _permute(t, config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads)
        if t.ndim == 2 and kind != "f32":
            if kind.startswith("q") and t.shape[1] % 32:
                raise ValueError(f"{name}: rows of {t.shape[1]} values do not split into {kind}'s 32-value "
                                 f"blocks; export f32 or f16")
            data = quantize(t, qtype)
            w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fsync_path(tmp)
    tmp.rename(path)
    return path


def _write_tokenizer(w, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE metadata: an HFTokenizer's vocabulary and merges, or our byte tokenizer (also
    for a model given none) as 256 single-byte tokens and no merges."""
    import json

    spelling = _bytes_to_unicode()
    if getattr(tokenizer, "_tok", None) is None:      # ByteTokenizer (or none given): ids are bytes
        tokens = [spelling[b] for b in range(256)] + [f"<unused{i}>" for i in range(vocab_size - 256)]
        types = [1] * 256 + [5] * (vocab_size - 256)
        merges: list[str] = []
        pre = "default"
    else:
        spec = json.loads(tokenizer._tok.to_str())
        model = spec["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')}")
        vocab = dict(model["vocab"])
        special = {}
        for a in spec.get("added_tokens", []):
            vocab[a["content"]] = a["id"]
            special[a["id"]] = a.get("special", False)
        tokens = [""] * max(vocab_size, max(vocab.values()) + 1)
        for t, i in vocab.items():
            tokens[i] = t
        types = [3 if special.get(i) else (4 if i in special else 1) for i in range(len(tokens))]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        pre = "default"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    # llama.cpp refuses a byte-level vocabulary without merges, and gguf's writer drops an empty
    # array: a byte vocabulary gets one merge whose result is no token, so it never applies (our
    # reader drops such merges)
    w.add_token_merges(merges or [f"{spelling[0]} {spelling[0]}"])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        w.add_eos_token_id(tokenizer.eos_token_id)
    if getattr(tokenizer, "bos_token_id", None) is not None:
        w.add_bos_token_id(tokenizer.bos_token_id)
