"""Tiny artefacts many tests build: a BPE tokenizer trained on a few sentences, a random Hugging Face
checkpoint written by transformers itself, the small models the parity tests compare with PyTorch."""
import json

import numpy as np

VOCAB = 300          # the tiny BPE tokenizer's size, so a tiny model and the tokenizer can go together

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "to be or not to be, that is the question",
    "all that glitters is not gold",
    "née café über — naïve façade",
]


def make_tokenizer_dir(d, vocab_size=300):
    """Write a byte-level BPE tokenizer.json (+ tokenizer_config.json with an EOS) trained on SENTENCES."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    return d


def make_hf_checkpoint(d, arch="llama", max_pos=128, seed=0, **over):
    """A random checkpoint written by transformers' save_pretrained; returns the torch model."""
    import torch
    import transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                  initializer_range=0.2, rms_norm_eps=1e-5, attn_implementation="eager")
    common.update(over)
    if arch.startswith("llama"):   # "llama_bias": attention_bias, so q/k/v/o all carry biases
        cfg = transformers.LlamaConfig(tie_word_embeddings=True, attention_bias=arch == "llama_bias", **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(tie_word_embeddings=False, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():   # HF initialises biases to zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    model.eval()
    model.save_pretrained(d)
    return model


# one small model per architecture feature the parity tests cover
PARITY_CONFIGS = {
    # GQA, untied, no biases
    "llama-gqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    # tied embeddings, attention_bias (q/k/v and o biases), head_dim not hidden/heads
    "llama-tied-bias": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=1, head_dim=12,
                            tie_word_embeddings=True, attention_bias=True),
    # Qwen2: q/k/v biases, plain multi-head
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=4),
}


def make_model(kind, seed=0):
    """A 2-layer model of PARITY_CONFIGS[kind] with non-trivial norms and biases."""
    from cke_dist.model import LlamaConfig, Model
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      rope_theta=1000.0, rms_norm_eps=1e-5, **PARITY_CONFIGS[kind])
    model = Model.from_config(cfg, seed=seed, init_std=0.1)
    r = np.random.default_rng(seed + 100)
    for name, v in model.named_params.items():  # non-trivial norms and biases, so their grads mean something
        if name.endswith("norm.weight"):
            v[...] = 1.0 + 0.1 * r.standard_normal(v.shape)
        elif name.endswith(".bias"):
            v[...] = 0.1 * r.standard_normal(v.shape)
    return model


def batch(cfg, B=3, T=10, seed=0):
    """Random (inputs, targets) with two targets masked (-100)."""
    r = np.random.default_rng(seed)
    tok = r.integers(0, cfg.vocab_size, (B, T + 1))
    x, y = tok[:, :-1], tok[:, 1:].copy()
    y[0, 3] = y[2, 0] = -100
    return x, y
