"""PyTorch reference of our Llama / Qwen2 model, for tests only.

Written from the math with plain torch ops and autograd, independent of our
kernels, over a dict of HF-named tensors; `hf_model` builds the same weights in
transformers' own LlamaForCausalLM / Qwen2ForCausalLM, which proves names and
the RoPE convention against the real thing.
"""
import numpy as np
import torch
import torch.nn.functional as F


def torch_params(model, requires_grad=True):
    """HF name -> float32 leaf tensor with a copy of our weights."""
    return {name: torch.tensor(np.array(v), dtype=torch.float32, requires_grad=requires_grad)
            for name, v in model.named_params.items()}


def _rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


def rope_cos_sin(head_dim, theta, T):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    ang = torch.arange(T).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def forward(p, cfg, tokens):
    """tokens (B, T) -> logits (B, T, V), float32, autograd on p."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    B, T = tokens.shape
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cos, sin = rope_cos_sin(D, cfg.rope_theta, T)
    x = p["model.embed_tokens.weight"][tokens]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."

        def lin(v, name, bias_ok=True):
            b = p.get(pre + name + ".bias") if bias_ok else None
            return F.linear(v, p[pre + name + ".weight"], b)

        h = _rmsnorm(x, p[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = lin(h, "self_attn.q_proj").view(B, T, H, D).transpose(1, 2)
        k = lin(h, "self_attn.k_proj").view(B, T, KV, D).transpose(1, 2)
        v = lin(h, "self_attn.v_proj").view(B, T, KV, D).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
        s = (q @ k.transpose(-1, -2)) / D ** 0.5
        s = s.masked_fill(~mask, float("-inf"))
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        x = x + lin(y, "self_attn.o_proj")
        h = _rmsnorm(x, p[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        x = x + lin(F.silu(lin(h, "mlp.gate_proj")) * lin(h, "mlp.up_proj"), "mlp.down_proj")
    x = _rmsnorm(x, p["model.norm.weight"], cfg.rms_norm_eps)
    w = p["model.embed_tokens.weight"] if cfg.tie_word_embeddings else p["lm_head.weight"]
    return F.linear(x, w)


def loss_fn(logits, targets, ignore_index=-100):
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def hf_model(cfg, named_params):
    """transformers' model for cfg with our weights (eager attention, float32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_cfg = AutoConfig.for_model(**cfg.to_dict())
    hf_cfg._attn_implementation = "eager"
    m = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    sd = m.state_dict()
    with torch.no_grad():
        for name, v in named_params.items():
            if name not in sd:
                raise KeyError(f"transformers' {type(m).__name__} has no parameter {name}")
            sd[name].copy_(torch.from_numpy(np.array(v)))
    return m.eval()
