"""Our quantized model directories (written by `cke-dist quantize`): config.json with a
`quantization_config` and model.safetensors in HF names, '<name>' the values (int8 for Q8_0,
uint8 packed nibbles for Q4_0 / Q4_1), '<name>_scale' float16 block scales, '<name>_min' (Q4_1)
float16 block minimums; norms and biases float32. Each rank reads only its slices.
Tests: tests/unit/test_q8_0.py, tests/unit/test_q4.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cke_dist.formats.architectures import check_architecture
from cke_dist.formats.hf import SafetensorsFile, verify_manifest, write_safetensors
from cke_dist.formats.quant import Quant

Q8_METHOD = "cke_q8_0"      # config.json "quantization_config.quant_method" of a Q8_0 directory
QUANT_METHODS = {"q8_0": Q8_METHOD, "q4_0": "cke_q4_0", "q4_1": "cke_q4_1"}
SCALE_SUFFIX = "_scale"     # "<name>" values + "<name>_scale" float16 block scales
MIN_SUFFIX = "_min"         # Q4_1: "<name>_min" float16 block minimums


def quantized_kind(raw: dict, cfg_path) -> str | None:
    """'q8_0' / 'q4_0' / 'q4_1' for a config.json of ours, None for a float model, else ValueError."""
    qc = raw.get("quantization_config") or {}
    kinds = {v: k for k, v in QUANT_METHODS.items()}
    if qc.get("quant_method") in kinds:
        return kinds[qc["quant_method"]]
    if qc:
        raise ValueError(f"{cfg_path}: quantization_config.quant_method {qc.get('quant_method')!r} is not "
                         f"supported (ours are {sorted(kinds)}, written by `cke-dist quantize`)")
    return None


def read_quantized(d: Path, raw: dict, specs, kind: str) -> dict:
    """{name: Quant or float32 array} of this rank's slices (`specs`: cke_dist.model.layout.param_specs)."""
    check_architecture(raw, d / "config.json")
    verify_manifest(d)
    path = d / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a quantized directory holds its weights in model.safetensors")
    stored = SafetensorsFile(path)        # memory-mapped: each rank reads its slices only
    tensors = {}
    for spec in specs:
        name, shape = spec.name, spec.full
        if name not in stored.header:
            raise ValueError(f"{path}: missing tensor {name} that config.json needs")
        dtype = stored.header[name]["dtype"]
        if len(shape) == 2:
            sname, mname = name + SCALE_SUFFIX, name + MIN_SUFFIX
            want_s = (shape[0], shape[1] // 32)
            want_q = shape if kind == "q8_0" else (shape[0], shape[1] // 2)
            if dtype != ("I8" if kind == "q8_0" else "U8") or sname not in stored.header or \
                    (kind == "q4_1" and mname not in stored.header):
                raise ValueError(f"{path}: tensor {name} should be {kind.upper()} ({'int8' if kind == 'q8_0' else 'uint8'}"
                                 f" values + {sname}); found dtype {dtype}")
            if stored.shape(name) != want_q or stored.shape(sname) != want_s:
                raise ValueError(f"{path}: tensor {name} has shape {stored.shape(name)} / scales "
                                 f"{stored.shape(sname)}, the config expects {want_q} / {want_s}")
            q_index = spec.index
            if kind != "q8_0" and spec.dim == 1:     # packed: two values a byte along K
                q_index = (slice(None), slice(spec.start // 2, spec.stop // 2))
            tensors[name] = Quant(kind, stored.read(name, q_index, raw=True),
                                  _block_shard(spec, stored, sname, path),
                                  _block_shard(spec, stored, mname, path) if kind == "q4_1" else None)
        else:
            if stored.shape(name) != shape:
                raise ValueError(f"{path}: tensor {name} has shape {stored.shape(name)}, "
                                 f"the config expects {shape}")
            tensors[name] = stored.read(name, spec.index)
    return tensors


def _block_shard(spec, stored, sname, path):
    """The float32 per-block values (scales or minimums) of this rank's shard of a quantized tensor
    (blocks of 32 along a row)."""
    if spec.dim == 1:
        if spec.start % 32 or spec.stop % 32:
            raise ValueError(f"{path}: tensor {spec.name} is cut at columns {spec.start}:{spec.stop} for tensor "
                             f"parallelism, not on its 32-value blocks; use a tp size that cuts on block "
                             f"boundaries or the float32 directory")
        return stored.read(sname, (slice(None), slice(spec.start // 32, spec.stop // 32)))
    return stored.read(sname, spec.index)


def write_quantized(out_dir, config_dict: dict, kind: str, tensors: dict) -> None:
    """Write a quantized directory: `tensors` maps HF names to Quant (2-D weights) or float32 arrays."""
    flat = {}
    for name, t in tensors.items():
        if isinstance(t, Quant):
            flat[name] = np.ascontiguousarray(t.q)
            flat[name + SCALE_SUFFIX] = t.d.astype(np.float16)
            if t.m is not None:
                flat[name + MIN_SUFFIX] = t.m.astype(np.float16)
        else:
            flat[name] = np.ascontiguousarray(t)
    os.makedirs(out_dir, exist_ok=True)
    d = dict(config_dict)
    what = {"q8_0": "int8 '<name>'", "q4_0": "uint8 '<name>' (two 4-bit values a byte, GGML's order)",
            "q4_1": "uint8 '<name>' (two 4-bit values a byte) + float16 '<name>_min'"}[kind]
    d["quantization_config"] = {"quant_method": QUANT_METHODS[kind], "block_size": 32,
                                "scale_dtype": "float16",
                                "note": f"weights: {what} + float16 '<name>_scale' per 32-value block "
                                        f"(GGML {kind.upper()}); norms and biases float32"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")
    write_safetensors(flat, os.path.join(out_dir, "model.safetensors"), metadata={"format": QUANT_METHODS[kind]})
