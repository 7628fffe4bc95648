"""`cke-dist quantize`: write a Q8_0 (default), Q4_0 or Q4_1 copy of a model directory.

    cke-dist quantize --model DIR --out DIR_Q8
    cke-dist quantize --model DIR --out DIR_Q4 --format q4_0     # 4-bit: uint8 packed nibbles + scales

The copy holds config.json (with quantization_config.quant_method "cke_q8_0"),
model.safetensors in HF names (every 2-D weight as int8 '<name>' + float16
'<name>_scale', one scale per 32 values, GGML's Q8_0; norms and biases float32)
and the tokenizer files. `cke-dist generate --model DIR_Q8` reads it; the
kernels read the int8 blocks directly. Format and kernel: cke_kernels/q8_0.py, cke_kernels/q4.py.
Tests: tests/test_q8_0.py, tests/test_q4.py.
"""
from __future__ import annotations

import os
import shutil
import sys

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "cke_tokenizer.json")


def quantize_dir(model_dir, out_dir, kind: str = "q8_0") -> dict:
    """Quantize model_dir into out_dir; returns {"float32_bytes", "quantized_bytes"} of the weights read per token."""
    from .model.decode import InferenceModel, save_q8_dir
    if os.path.abspath(model_dir) == os.path.abspath(out_dir):
        raise ValueError(f"--out {out_dir} is the input directory; write the {kind.upper()} copy somewhere else")
    f32 = InferenceModel.from_dir(model_dir)
    if f32.quantize is not None:
        raise ValueError(f"{model_dir} is already a {f32.quantize.upper()} directory; quantize the float one")
    q8 = f32.to_quantized(kind)
    save_q8_dir(q8, out_dir)
    for name in TOKENIZER_FILES:
        src = os.path.join(model_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
    return {"float32_bytes": f32.weight_bytes_per_token(), "quantized_bytes": q8.weight_bytes_per_token()}


def add_arguments(p):
    p.add_argument("--model", required=True, help="input model directory (HF config.json + safetensors)")
    p.add_argument("--out", required=True, help="output directory for the quantized copy")
    p.add_argument("--format", choices=["q8_0", "q4_0", "q4_1"], default="q8_0",
                   help="q8_0 (default: int8 blocks), q4_0 / q4_1 (4-bit blocks, GGML's formats)")


def run(args) -> int:
    sizes = quantize_dir(args.model, args.out, args.format)
    print(f"wrote {args.out}: weights read per token {sizes['float32_bytes'] / 2**20:.1f} MiB (float32) -> "
          f"{sizes['quantized_bytes'] / 2**20:.1f} MiB ({args.format.upper()})", file=sys.stderr)
    return 0
