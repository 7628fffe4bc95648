"""GGUF files out: our config, tensors (HF names) and tokenizer as llama.cpp's converter writes them
(formats/gguf.py's docstring says the rules). Tests: tests/integration/test_gguf.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cke_dist.formats.architectures import ARCHITECTURES, LM_HEAD
from cke_dist.formats.gguf import GLOBAL_NAMES, LAYER_ROLES, llama3_divisors
from cke_dist.formats.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, bytes_to_unicode
from cke_dist.formats.hf import fsync_path

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}      # llama.cpp's LLAMA_FTYPE_* of a whole file


def gguf_name(hf: str) -> str:
    """The GGUF tensor name of an HF one (the inverse of hf_name)."""
    for g, h in GLOBAL_NAMES.items():
        if h == hf:
            return g
    p = hf.split(".")
    role = ".".join(p[3:-1])
    key = next(k for k, v in LAYER_ROLES.items() if v == role)
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


def _pre_name(spec: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a byte-level tokenizer.json's split: GPT-2's
    (ByteLevel's own regex: "default", which SmolLM's "smollm" also is), or Llama 3's / Qwen2's split
    regex. Any other split would be tokenized differently by llama.cpp: refused, with the reason."""
    pre = spec.get("pre_tokenizer") or {}
    if spec["model"].get("byte_fallback") or (spec.get("decoder") or {}).get("type") == "Sequence":
        raise ValueError("GGUF export writes byte-level BPE vocabularies; this one is SentencePiece-style "
                         "(byte fallback): export to a Hugging Face directory instead")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "default"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [st.get("pattern", {}).get("Regex") for st in steps if st.get("type") == "Split"]
    if len(splits) == 1 and len(steps) == 2 and steps[1].get("type") == "ByteLevel":
        for name, regex in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT)):
            if splits[0] == regex:
                return name
    raise ValueError(f"GGUF export: the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) has no llama.cpp "
                     f"name, so llama.cpp would split text differently; export to a Hugging Face directory instead")


def _write_tokenizer(w, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE metadata: an HFTokenizer's vocabulary and merges, or our byte tokenizer (also
    for a model given none) as 256 single-byte tokens and no merges."""
    spelling = bytes_to_unicode()
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
        pre = _pre_name(spec)
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
