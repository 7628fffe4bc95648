"""The Llama / Qwen2 model: config, flat-buffer parameters, forward/backward on our kernels.

    from cke_dist.model import LlamaConfig, Model, load_model
    cfg = LlamaConfig.from_json("config.json")
    model = Model.from_config(cfg, seed=0)      # or load_model("hf_dir"); tp_group=g for a shard
    logits = model.forward(tokens)              # (B, T) ints -> (B, T, V)
    loss = model.forward_backward(tokens, targets)
    model.named_grads["model.layers.0.mlp.up_proj.weight"]
    model.save("out_dir")
"""
from .config import LlamaConfig
from .layout import LM_HEAD, param_shapes, param_specs
from .llama import Model, check_names


def load_model(model_dir, tp_group=None, stage=None) -> Model:
    """A Model from a Hugging Face directory (config.json + model.safetensors, or shards + index), or
    from a GGUF file (dequantized to float32: cke_dist.model.gguf_io).

    With a tp group and/or a pipeline stage, each rank reads only its tensors and its slices of
    them (memory-mapped), never a whole tensor it does not keep. A checkpoint of ours (any layout:
    its manifest.json lists which slices each file holds) loads the same way onto any layout, each
    file it reads verified against the manifest first."""
    import os

    import numpy as np

    from .gguf_io import GGUFTensors, gguf_config, is_gguf
    from .hf_io import open_hf_tensors, read_hf_config
    if is_gguf(model_dir):     # llama.cpp's single file: dequantized to float32 tensor by tensor
        config_dict = gguf_config(model_dir)
        files, source, where = GGUFTensors(model_dir, config_dict), os.fspath(model_dir), os.fspath(model_dir)
    else:
        config_dict = read_hf_config(model_dir)
        files = open_hf_tensors(model_dir)   # name -> pieces, each file verified when first read
        source = os.path.join(os.fspath(model_dir), "model*.safetensors")
        where = os.path.join(os.fspath(model_dir), "config.json")
    try:
        cfg = LlamaConfig.from_dict(config_dict)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    model = Model(cfg, tp_group=tp_group, stage=stage)
    names = set(files)
    if cfg.tie_word_embeddings and LM_HEAD in names:
        # some tools write the tied head too; it must be the embedding (compared shard by shard)
        emb = next(s for s in param_specs(cfg, model.tp_size, model.tp_rank) if s.name == "model.embed_tokens.weight")
        if not np.array_equal(files.read(LM_HEAD, emb.index), files.read(emb.name, emb.index)):
            raise ValueError(f"{source}: config.json has tie_word_embeddings=true but lm_head.weight "
                             f"differs from model.embed_tokens.weight; set tie_word_embeddings=false")
        names.discard(LM_HEAD)
    check_names({s.name for s in param_specs(cfg)}, names, source)
    for spec in model.specs:
        if files.shape(spec.name) != spec.full:
            raise ValueError(f"{source}: tensor {spec.name} has shape {files.shape(spec.name)}, "
                             f"the config expects {spec.full}")
        model.named_params[spec.name][...] = files.read(spec.name, spec.index)
    return model


__all__ = ["LlamaConfig", "Model", "load_model", "param_shapes", "param_specs"]
