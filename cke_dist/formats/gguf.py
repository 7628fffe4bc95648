"""GGUF files (llama.cpp's format) in: config, tensors under HF names, chat template. The tokenizer
rebuild is gguf_tokenizer.py, the writer gguf_write.py; the rules below hold for all three.

    cfg = gguf_config("model.gguf")                 # an HF config dict (llama or qwen2)
    src = GGUFTensors("model.gguf", cfg)            # .read(hf_name, index): float32, as load_model reads
    tok = load_tokenizer("model.gguf")              # cke_dist.formats.tokenizer, through gguf_tokenizer.py

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
  (tests/integration/test_gguf.py). Two departures, both toward SentencePiece and llama.cpp: a file with
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
Tests: tests/integration/test_gguf.py.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from cke_dist.formats.architectures import ARCHITECTURES, EMBED, LM_HEAD, NORM
from cke_dist.formats.quant import Quant

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# HF role of each per-layer GGUF tensor (blk.N.<key>.weight / .bias)
LAYER_ROLES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
GLOBAL_NAMES = {"token_embd.weight": EMBED, "output_norm.weight": NORM, "output.weight": LM_HEAD}

class GGUFError(ValueError):
    """A GGUF file this reader cannot turn into a model (the message names what and why)."""


def is_gguf(path) -> bool:
    p = Path(path)
    return p.suffix.lower() == ".gguf" and p.is_file()


def missing_model(path) -> FileNotFoundError:
    """The error for a model argument that names neither a directory nor a GGUF file."""
    p = Path(path)
    if p.is_file():
        return FileNotFoundError(f"{p} is a file but not a GGUF file (*.gguf): give a GGUF file or a model "
                                 f"directory (config.json + safetensors)")
    return FileNotFoundError(f"model {p} does not exist: give a model directory (config.json + safetensors) or a "
                             f"GGUF file")


def open_reader(path):
    p = Path(path).resolve()
    return _cachedopen_reader(str(p), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cachedopen_reader(path: str, mtime_ns: int):
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


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(path, reader=None) -> dict:
    """The HF config.json dict the file's metadata describes."""
    r = reader or open_reader(path)
    arch = field(r, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")

    def need(key):
        v = field(r, f"{arch}.{key}")
        if v is None:
            raise GGUFError(f"{path}: metadata {arch}.{key} is missing")
        return v
    names = {t.name for t in r.tensors}
    heads = int(need("attention.head_count"))
    tokens = field(r, "tokenizer.ggml.tokens")
    vocab = field(r, f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = next(t.shape for t in r.tensors if t.name == "token_embd.weight")[-1]
    cfg = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "vocab_size": int(vocab), "hidden_size": int(need("embedding_length")),
        "intermediate_size": int(need("feed_forward_length")), "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(r, f"{arch}.attention.head_count_kv", heads)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(field(r, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    key_len = field(r, f"{arch}.attention.key_length")
    if key_len is not None and int(key_len) != cfg["hidden_size"] // heads:
        cfg["head_dim"] = int(key_len)
    scaling = _rope_scaling(path, r, arch, int(key_len or cfg["hidden_size"] // heads), cfg["rope_theta"])
    if scaling is not None:
        cfg["rope_scaling"] = {"rope_type": "llama3", **scaling}
    for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        v = field(r, name)
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
    kind = field(r, f"{arch}.rope.scaling.type", "linear")
    scale = float(field(r, f"{arch}.rope.scaling.factor", field(r, f"{arch}.rope.scale_linear", 0.0)))
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
    known = field(r, f"{arch}.rope.scaling.original_context_length")
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
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_ROLES and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{LAYER_ROLES[parts[2]]}.{parts[3]}"
    return None


class GGUFTensors:
    """HF name -> float32 tensors of a GGUF file, as `open_hf_tensors` gives them for a directory
    (read(name, index), shape(name)); each read dequantizes that whole tensor, then cuts."""

    def __init__(self, path, config: dict, reader=None):
        self.path = Path(path)
        self.reader = reader or open_reader(path)
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
    return field(reader or open_reader(path), "tokenizer.chat_template")


def gguf_special_tokens(path, reader=None) -> dict[str, str]:
    """bos_token / eos_token (/ unk, pad) texts, the variables a chat template may use."""
    r = reader or open_reader(path)
    tokens = field(r, "tokenizer.ggml.tokens") or []
    out = {}
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        i = field(r, f"tokenizer.ggml.{name}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            out[f"{key}_token"] = tokens[int(i)]
    return out
