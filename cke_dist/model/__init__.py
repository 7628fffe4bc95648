"""The Llama / Qwen2 model: config, flat-buffer parameters, forward/backward on our kernels.

    from cke_dist.model import LlamaConfig, Model, load_model
    cfg = LlamaConfig.from_json("config.json")
    model = Model.from_config(cfg, seed=0)      # or load_model("hf_dir"); tp_group=g for a shard
    im = load_inference_model("model.gguf")      # the inference model: KV cache, quantized linears
    logits = model.forward(tokens)              # (B, T) ints -> (B, T, V)
    loss = model.forward_backward(tokens, targets)
    model.named_grads["model.layers.0.mlp.up_proj.weight"]
    model.save("out_dir")
"""
from cke_dist.model.config import LlamaConfig
from cke_dist.model.layout import param_shapes, param_specs
from cke_dist.model.llama import Model
from cke_dist.model.load import load_inference_model, load_model

__all__ = ["LlamaConfig", "Model", "load_inference_model", "load_model", "param_shapes", "param_specs"]
