"""`cke-dist quantize`: write a Q8_0 (default), Q4_0 or Q4_1 copy of a model directory.

    cke-dist quantize --model DIR --out DIR_Q8
    cke-dist quantize --model DIR --out DIR_Q4 --format q4_0     # 4-bit: uint8 packed nibbles + scales

The copy holds config.json (with quantization_config.quant_method "cke_q8_0"),
model.safetensors in HF names (every 2-D weight as int8 '<name>' + float16
'<name>_scale', one scale per 32 values, GGML's Q8_0; norms and biases float32)
and the tokenizer files. `cke-dist generate --model DIR_Q8` reads it; the
kernels read the int8 blocks directly. Format and kernel: cke_kernels/q8_0.py, cke_kernels/q4.py.
Tests: tests/unit/test_q8_0.py, tests/unit/test_q4.py.
"""
from __future__ import annotations

import sys

from cke_dist.model.convert import quantize_dir


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
