"""The Llama / Qwen2 model: config, flat-buffer parameters, forward/backward on our kernels.

    from cke_dist.model import LlamaConfig, Model, load_model
    cfg = LlamaConfig.from_json("config.json")
    model = Model.from_config(cfg, seed=0)      # or load_model("hf_dir")
    logits = model.forward(tokens)              # (B, T) ints -> (B, T, V)
    loss = model.forward_backward(tokens, targets)
    model.named_grads["model.layers.0.mlp.up_proj.weight"]
    model.save("out_dir")
"""
from .config import LlamaConfig
from .llama import Model, param_shapes


def load_model(model_dir, tp_group=None) -> Model:
    """A Model from a Hugging Face directory (config.json + model.safetensors, or shards + index)."""
    import os

    from .hf_io import read_hf_dir
    config_dict, tensors = read_hf_dir(model_dir)
    try:
        cfg = LlamaConfig.from_dict(config_dict)
    except ValueError as e:
        raise ValueError(f"{os.path.join(os.fspath(model_dir), 'config.json')}: {e}") from None
    model = Model(cfg, tp_group=tp_group)
    single = os.path.join(os.fspath(model_dir), "model.safetensors")
    source = single if os.path.exists(single) else os.path.join(os.fspath(model_dir), "model-*.safetensors")
    model.load_state_dict(tensors, source=source)
    return model


__all__ = ["LlamaConfig", "Model", "load_model", "param_shapes"]
