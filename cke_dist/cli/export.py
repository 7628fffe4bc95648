"""`cke-dist export CKPT OUT [--max-shard-mb N]`: a checkpoint as a plain Hugging Face directory;
`cke-dist export CKPT OUT.gguf --format gguf [--type f32|f16|q8_0|q4_0]`: as one GGUF file that
llama.cpp and transformers' GGUF loader read (cke_dist.formats.gguf.write_gguf);
`cke-dist export CKPT OUT --format peft`: a LoRA checkpoint's adapters as PEFT's adapter directory.
A LoRA checkpoint exported as hf or gguf is its base with the adapters merged in.

Writes config.json, the weights as model.safetensors or, past --max-shard-mb, as
model-0000x-of-0000y.safetensors with model.safetensors.index.json (what `save_pretrained` writes),
and the tokenizer files the checkpoint carries; no optimizer or trainer state. The checkpoint's
manifest is verified first; OUT is written beside itself and renamed into place, so it is never
half there. `transformers` loads the result as it is. Tests: tests/integration/test_export.py.
"""
from __future__ import annotations

import sys

from cke_dist.formats.checkpoint import CheckpointError
from cke_dist.formats.hf import HFFormatError
from cke_dist.model.convert import export_gguf, export_hf, export_peft

def add_arguments(p) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint directory, or a run directory (its newest)")
    p.add_argument("out", metavar="OUT", help="the Hugging Face directory to write (must not exist yet)")
    p.add_argument("--max-shard-mb", type=float, default=2048.0,
                   help="largest weight file in MiB before the weights are split into shards (default 2048)")
    p.add_argument("--format", choices=["hf", "gguf", "peft"], default="hf",
                   help="hf: a directory (default); gguf: one file (LoRA adapters merged into the base for "
                        "both); peft: a LoRA checkpoint's adapters as PEFT's adapter directory")
    p.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="GGUF: how 2-D weights are stored (norms and biases stay f32)")


def run(args) -> int:
    try:
        if args.format == "gguf":
            out = export_gguf(args.checkpoint, args.out, args.type)
        elif args.format == "peft":
            out = export_peft(args.checkpoint, args.out)
        else:
            out = export_hf(args.checkpoint, args.out, args.max_shard_mb)
    except (FileNotFoundError, FileExistsError, CheckpointError, HFFormatError, ValueError) as e:
        print(f"cke-dist export: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
