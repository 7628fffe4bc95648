"""GGUF files (llama.cpp's format) in: config, tensors under HF names, tokenizer, chat template.

    cfg = gguf_config("model.gguf")                 # an HF config dict (llama or qwen2)
    src = GGUFTensors("model.gguf", cfg)            # .read(hf_name, index): float32, as load_model reads
    tok = gguf_tokenizer("model.gguf")              # cke_dist.tokenizer.HFTokenizer built from metadata

Rules this module keeps:
- The file is read with the `gguf` package (llama.cpp's own reader) and dequantized by it, so a
  tensor comes back as float32 exactly as llama.cpp's reference dequantization gives it. Types:
  F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K; any other is an error naming the tensor and
  its type. Architectures: llama (SmolLM, Llama 2/3, Mistral-style) and qwen2.
- llama.cpp's converter permutes the rows of q and k of the llama architecture for its RoPE
  layout; reading undoes it (qwen2 files are not permuted).
- The tokenizer is rebuilt from the metadata with the `tokenizers` library the way transformers
  builds it from the same file (byte-level BPE of `tokenizer.ggml.model = gpt2`, its split regex
  from `tokenizer.ggml.pre`, control tokens as specials): ids equal transformers' on the same
  file (tests/test_gguf.py). SentencePiece (`llama`) vocabularies are not rebuilt yet: an error
  says so.
Tests: tests/test_gguf.py.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .layout import EMBED, LM_HEAD, NORM

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
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
    if "rope_freqs.weight" in names or _field(r, f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise GGUFError(f"{path}: RoPE scaling ({_field(r, f'{arch}.rope.scaling.type', 'rope_freqs.weight')}) "
                        f"is not read from GGUF yet; use the Hugging Face directory of this model")
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
    for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        v = _field(r, name)
        if v is not None:
            cfg[key] = int(v)
    return cfg


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

        from .decode import Quant
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
    for key in ("bos", "eos", "unk", "pad"):
        i = _field(r, f"tokenizer.ggml.{key}_token_id" if key != "pad" else "tokenizer.ggml.padding_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            out[f"{key}_token"] = tokens[int(i)]
    return out


def gguf_tokenizer(path, reader=None):
    """An HFTokenizer (cke_dist.tokenizer) rebuilt from the file's tokenizer metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    from ..tokenizer import HFTokenizer

    r = reader or _reader(path)
    kind = _field(r, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model = {kind!r}; only byte-level BPE ('gpt2': Llama 3, Qwen2, "
                        f"SmolLM) is rebuilt from GGUF so far")
    pre = _field(r, "tokenizer.ggml.pre", "default")
    if pre in _UNSUPPORTED_SPLITS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre = {pre!r} is not supported")
    tokens = list(_field(r, "tokenizer.ggml.tokens"))
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
    eos = _field(r, "tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    eot = _field(r, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    bos = _field(r, "tokenizer.ggml.bos_token_id")
    return HFTokenizer.from_tokenizer(tok, eos_ids, None if bos is None else int(bos), source=str(path))


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
    as GGUF metadata. Written beside the target and renamed, so it is never half there."""
    import gguf
    from gguf.quants import quantize

    if kind not in GGUF_TYPES:
        raise ValueError(f"GGUF type {kind!r}: one of {', '.join(GGUF_TYPES)}")
    arch = config.model_type
    if arch not in ARCHITECTURES:
        raise ValueError(f"model_type {arch!r}: GGUF export supports {sorted(ARCHITECTURES)}")
    if config.rope_scaling:
        raise ValueError("RoPE scaling is not written to GGUF yet; export f32 safetensors instead")
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
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(_FILE_TYPE[kind])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(w, tokenizer, config.vocab_size)    # llama.cpp refuses a file without one
    if chat_template:
        w.add_chat_template(chat_template)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
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
    from .hf_io import fsync_path
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
