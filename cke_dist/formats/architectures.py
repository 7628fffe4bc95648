"""What we read and write, named once: the model types and their Hugging Face architecture names
(GGUF's `general.architecture` is the model type), the HF names of the tensors outside the layers,
and the tokenizer files that travel with a model.
Tests: tests/unit/test_hf_io.py, tests/integration/test_gguf.py.
"""
from __future__ import annotations

# model_type (config.json; GGUF's general.architecture) -> config.json "architectures"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# HF names of the tensors outside the layers (the layers' names: cke_dist.model.layout.layer_names)
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

# Files copied beside the weights whenever a model is written (export, quantize): the tokenizer
# and the chat template serving renders (transformers >= 4.43 writes it as its own file).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json", "cke_tokenizer.json")


def check_architecture(raw: dict, cfg_path) -> None:
    """A config.json dict names a model we run (its `architectures` and `model_type`), or ValueError."""
    arch = raw.get("architectures") or []
    bad = [a for a in arch if a not in ARCHITECTURES.values()]
    if bad:
        raise ValueError(f"{cfg_path}: architecture {bad[0]!r} is not supported; "
                         f"supported: {sorted(ARCHITECTURES.values())}")
    mt = raw.get("model_type", "llama")
    if mt not in ARCHITECTURES:
        raise ValueError(f"{cfg_path}: model_type {mt!r} is not supported; supported: {sorted(ARCHITECTURES)}")
