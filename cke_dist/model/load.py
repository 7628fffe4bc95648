"""Models from files: the training Model (`load_model`) and the InferenceModel (`load_inference_model`)
from a Hugging Face directory, one of our checkpoints, a quantized directory or a GGUF file; each
rank reads only its slices (its tp shard of its pipeline stage), never a whole tensor it does not keep.

    model = load_model("hf_dir", tp_group=g, stage=s)
    im = load_inference_model("SmolLM2.Q4_1.gguf")          # GGUF weights stay in their blocks
    save_quantized(im.to_quantized("q8_0"), "dir_q8")       # read back by load_inference_model
Tests: tests/unit/test_hf_io.py, tests/integration/test_generate.py, tests/unit/test_q8_0.py,
tests/integration/test_gguf.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cke_dist.formats.architectures import check_architecture
from cke_dist.formats.checkpoint import model_path
from cke_dist.formats.gguf import GGUFTensors, gguf_config, is_gguf, missing_model
from cke_dist.formats.hf import check_file, open_hf_tensors, read_hf_config, read_manifest, read_safetensors
from cke_dist.formats.quant import Quant
from cke_dist.formats.quantized import quantized_kind, read_quantized, write_quantized
from cke_dist.model.config import LlamaConfig
from cke_dist.model.inference import InferenceModel, Linear
from cke_dist.model.layout import EMBED, LM_HEAD, NORM, layer_names, param_specs
from cke_dist.model.llama import Model, check_names
from cke_dist.model.lora import ADAPTER_CONFIG, ADAPTER_STEM, merge_adapter, read_adapter_config


def load_model(model_dir, tp_group=None, stage=None) -> Model:
    """A Model from a Hugging Face directory (config.json + model.safetensors, or shards + index), or
    from a GGUF file (dequantized to float32: cke_dist.formats.gguf).

    With a tp group and/or a pipeline stage, each rank reads only its tensors and its slices of
    them (memory-mapped), never a whole tensor it does not keep. A checkpoint of ours (any layout:
    its manifest.json lists which slices each file holds) loads the same way onto any layout, each
    file it reads verified against the manifest first. A run directory means its newest checkpoint."""
    model_dir = model_path(model_dir)
    if not is_gguf(model_dir) and (model_dir / ADAPTER_CONFIG).is_file():
        return _load_merged(model_dir, tp_group, stage)
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


def _load_merged(adapter_dir: Path, tp_group, stage) -> Model:
    """A LoRA checkpoint (or PEFT adapter directory): its base model with the adapters merged in."""
    settings = read_adapter_config(adapter_dir)
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    if not base or not Path(base).exists():
        raise FileNotFoundError(f"{adapter_dir / ADAPTER_CONFIG}: its base model {base!r} is not there; "
                                f"put it back or edit base_model_name_or_path")
    if read_manifest(adapter_dir) is not None:
        tensors = open_hf_tensors(adapter_dir)                 # ours: each file verified, any layout
    else:
        tensors = read_safetensors(adapter_dir / f"{ADAPTER_STEM}.safetensors")   # PEFT's own
    model = load_model(base, tp_group=tp_group, stage=stage)
    try:
        merge_adapter(model, tensors, settings)
    except KeyError as e:
        raise ValueError(f"{adapter_dir}: the adapter lacks {e.args[0]} that {ADAPTER_CONFIG} promises") from None
    return model


def load_inference_model(model_dir, quantize: str | None = None, tp_group=None, stage=None) -> InferenceModel:
    """An InferenceModel from an HF directory or checkpoint (float32/16 weights, through load_model),
    a quantized directory of ours, or a GGUF file (its Q8_0 / Q4_0 / Q4_1 weights as stored, K-quants
    to the nearest of those: GGUFTensors.read_native). `quantize` quantizes float weights at load.
    A run directory means its newest checkpoint."""
    d = model_path(model_dir)
    if is_gguf(d):
        if quantize is not None:       # dequantized to float32, then quantized as asked
            return InferenceModel.from_model(load_model(d, tp_group=tp_group, stage=stage), quantize=quantize)
        raw = gguf_config(d)
        cfg = LlamaConfig.from_dict(raw)
        src = GGUFTensors(d, raw)
        tensors = {}
        for spec in _specs(cfg, tp_group, stage):
            if spec.name not in src:
                raise ValueError(f"{d}: no tensor for {spec.name}, which config needs")
            tensors[spec.name] = src.read_native(spec.name, spec)
        return InferenceModel(cfg, tensors, tp_group, stage=stage)
    raw = read_model_config(d)
    kind = quantized_kind(raw, d / "config.json")
    if kind is not None:
        cfg = LlamaConfig.from_dict({k: v for k, v in raw.items() if k != "quantization_config"})
        return InferenceModel(cfg, read_quantized(d, raw, _specs(cfg, tp_group, stage), kind), tp_group, stage=stage)
    check_architecture(raw, d / "config.json")
    return InferenceModel.from_model(load_model(d, tp_group=tp_group, stage=stage), quantize=quantize)


def _specs(cfg, tp_group, stage):
    tp = getattr(tp_group, "size", 1) if tp_group is not None else 1
    return param_specs(cfg, tp, tp_group.rank if tp > 1 else 0, stage)


def read_model_config(model_dir) -> dict:
    """config.json of a float or a quantized directory (checked against its manifest when it has
    one), or the config a GGUF file's metadata describes."""
    if is_gguf(model_dir):
        return gguf_config(model_dir)
    d = Path(model_dir)
    path = d / "config.json"
    if not d.is_dir():
        raise missing_model(d)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a model directory needs config.json + safetensors")
    manifest = read_manifest(d)
    if manifest is not None:
        check_file(path, manifest["files"].get("config.json"))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def save_quantized(im: InferenceModel, out_dir) -> None:
    """Write a quantized directory (Q8_0, Q4_0 or Q4_1, whichever `im` holds) of a whole model
    (cke_dist.formats.quantized says the layout)."""
    if im.quantize not in Quant.KINDS:
        raise ValueError("save_quantized needs an InferenceModel built with quantize='q8_0', 'q4_0' or 'q4_1'")
    if im.tp_size > 1 or not (im.stage.first and im.stage.last):
        raise ValueError("save_quantized writes a whole model; quantize the one-process model")
    cfg = im.config
    tensors = {NORM: im.norm}

    def put(names, lin_or_quant, bias_names=(), rows=None):
        """Rows of one fused product (q/k/v, gate/up) back under their own names."""
        qt = lin_or_quant.quant if isinstance(lin_or_quant, Linear) else lin_or_quant
        rows = rows or [qt.q.shape[0]]
        r0 = 0
        for n, r in zip(names, rows):
            tensors[n] = Quant(qt.kind, qt.q[r0:r0 + r], qt.d[r0:r0 + r], None if qt.m is None else qt.m[r0:r0 + r])
            r0 += r
        if isinstance(lin_or_quant, Linear) and lin_or_quant.bias is not None:
            b0 = 0
            for bn, r in zip(bias_names, rows):
                tensors[bn] = lin_or_quant.bias[b0:b0 + r]
                b0 += r

    put([EMBED], im.embed_q)
    D = im.head_dim
    for i, L in enumerate(im.layers):
        n = layer_names(cfg, i)
        tensors[n["ln1"][0]], tensors[n["ln2"][0]] = L["ln1"], L["ln2"]
        put(n["qkv"], L["qkv"], n["qkv_bias"], rows=[im.heads.n_q * D, im.heads.n_kv * D, im.heads.n_kv * D])
        put(n["o"], L["o"])
        if n["o_bias"]:
            tensors[n["o_bias"][0]] = L["o_bias"]
        put(n["gate_up"], L["gate_up"], rows=[L["gate_up"].out_features // 2] * 2)
        put(n["down"], L["down"])
    if not cfg.tie_word_embeddings:
        put([LM_HEAD], im.lm_head)
    write_quantized(out_dir, cfg.to_dict(), im.quantize, tensors)
