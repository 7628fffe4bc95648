"""LlamaConfig: the model's shape, with Hugging Face `config.json` names.

A plain dataclass (nanoGPT style). `from_dict` accepts the config.json that
transformers writes for LlamaForCausalLM / Qwen2ForCausalLM: keys we do not use
are kept in `extra` and written back by `to_dict`; keys that would change the
computation in a way we do not implement (RoPE scaling other than Llama 3's,
sliding windows, MLP bias, another activation) and impossible shapes raise
ValueError naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from cke_dist.formats.architectures import ARCHITECTURES

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# keys of ours that to_dict writes; everything else from the input goes to `extra`
_OURS = set(_REQUIRED) | {"num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                          "rope_theta", "tie_word_embeddings", "attention_bias", "model_type", "architectures",
                          "rope_parameters"}
# Llama 3.x RoPE scaling (rope_type "llama3"): these keys, all required
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None   # None -> num_attention_heads (plain multi-head)
    head_dim: int | None = None              # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None       # None -> True for qwen2 (q/k/v biases), False for llama
    model_type: str = "llama"
    architectures: list[str] | None = None
    rope_scaling: dict | None = None         # Llama 3 scaling: the _LLAMA3_KEYS; None = plain RoPE
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"config key 'model_type' is {self.model_type!r}; supported: {sorted(ARCHITECTURES)}")
        for key in _REQUIRED + ("max_position_embeddings",):
            val = getattr(self, key)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"config key {key!r} must be a positive integer, got {val!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_bias is None:
            self.attention_bias = self.model_type == "qwen2"
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ValueError("config key 'attention_bias' is False, but qwen2 models always have q/k/v biases")
        for key in ("num_key_value_heads", "head_dim"):
            val = getattr(self, key)
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"config key {key!r} must be a positive integer, got {val!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"config key 'num_attention_heads' ({self.num_attention_heads}) does not divide "
                    f"'hidden_size' ({self.hidden_size}); pick a head count that divides it or set 'head_dim'")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"config key 'head_dim' must be even for RoPE, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config key 'num_key_value_heads' ({self.num_key_value_heads}) does not divide "
                f"'num_attention_heads' ({self.num_attention_heads})")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"config key 'rms_norm_eps' must be a positive number, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"config key 'rope_theta' must be a positive number, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            r = self.rope_scaling
            if set(r) != set(_LLAMA3_KEYS) or not (r["factor"] > 0 and r["high_freq_factor"] > r["low_freq_factor"] > 0
                                                   and r["original_max_position_embeddings"] > 0):
                raise ValueError(f"config key 'rope_parameters' (llama3) needs positive {list(_LLAMA3_KEYS)} with "
                                 f"high_freq_factor > low_freq_factor, got {r!r}")
        self.rms_norm_eps = float(self.rms_norm_eps)
        self.rope_theta = float(self.rope_theta)
        self.tie_word_embeddings = bool(self.tie_word_embeddings)
        self.attention_bias = bool(self.attention_bias)
        if self.architectures is None:
            self.architectures = [ARCHITECTURES[self.model_type]]

    @property
    def o_proj_bias(self) -> bool:
        """Llama's attention_bias also biases o_proj; Qwen2 has q/k/v biases only."""
        return self.model_type == "llama" and self.attention_bias

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"config is missing required key(s) {missing}")
        model_type = d.get("model_type", "llama")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"config key 'rope_parameters' must be a mapping, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"config key 'rope_parameters.rope_type' is {rope_type!r}; only 'default' and "
                             f"'llama3' RoPE are implemented")
        scaling = None
        if rope_type == "llama3":
            missing = [k for k in _LLAMA3_KEYS if k not in rope]
            if missing:
                raise ValueError(f"config key 'rope_parameters' (rope_type 'llama3') lacks {missing}")
            scaling = {k: rope[k] for k in _LLAMA3_KEYS}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        if d.get("mlp_bias"):
            raise ValueError("config key 'mlp_bias' is true; MLP biases are not implemented")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config key 'hidden_act' is {d['hidden_act']!r}; only 'silu' (SwiGLU) is implemented")
        if d.get("use_sliding_window"):
            raise ValueError("config key 'use_sliding_window' is true; sliding-window attention is not implemented")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"config key 'pretraining_tp' is {d['pretraining_tp']}; only 1 is implemented")
        extra = {k: v for k, v in d.items() if k not in _OURS}
        extra.pop("rope_scaling", None)
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias") if model_type == "llama" else True,
            model_type=model_type, architectures=d.get("architectures"), rope_scaling=scaling, extra=extra)

    @classmethod
    def from_json(cls, path) -> "LlamaConfig":
        path = os.fspath(path)
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """A config.json that transformers loads as LlamaForCausalLM / Qwen2ForCausalLM."""
        d = dict(self.extra)
        d.update({
            "architectures": list(self.architectures), "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_parameters": ({"rope_type": "llama3", "rope_theta": self.rope_theta, **self.rope_scaling}
                                if self.rope_scaling else {"rope_type": "default", "rope_theta": self.rope_theta}),
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
        })
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        else:
            d["use_sliding_window"] = False
        # our tensors are float32 whatever the source checkpoint was stored in
        d["dtype"] = "float32"
        d.pop("torch_dtype", None)
        return d

    def to_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)
