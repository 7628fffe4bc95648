"""`cke-dist export CKPT OUT [--max-shard-mb N]`: a checkpoint as a plain Hugging Face directory;
`cke-dist export CKPT OUT.gguf --format gguf [--type f32|f16|q8_0|q4_0]`: as one GGUF file that
llama.cpp and transformers' GGUF loader read (cke_dist.model.gguf_io.write_gguf).

Writes config.json, the weights as model.safetensors or, past --max-shard-mb, as
model-0000x-of-0000y.safetensors with model.safetensors.index.json (what `save_pretrained` writes),
and the tokenizer files the checkpoint carries; no optimizer or trainer state. The checkpoint's
manifest is verified first; OUT is written beside itself and renamed into place, so it is never
half there. `transformers` loads the result as it is. Tests: tests/test_export.py.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "cke_tokenizer.json")


def add_arguments(p) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint directory, or a run directory (its newest)")
    p.add_argument("out", metavar="OUT", help="the Hugging Face directory to write (must not exist yet)")
    p.add_argument("--max-shard-mb", type=float, default=2048.0,
                   help="largest weight file in MiB before the weights are split into shards (default 2048)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf: a directory (default); gguf: one file")
    p.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="GGUF: how 2-D weights are stored (norms and biases stay f32)")


def export(checkpoint, out, max_shard_mb: float = 2048.0) -> Path:
    from .checkpoint import find_checkpoint
    from .model import load_model
    from .model.hf_io import fsync_path, write_hf_dir

    src, out = find_checkpoint(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; export writes a new directory")
    if not max_shard_mb > 0:
        raise ValueError(f"--max-shard-mb {max_shard_mb}: must be > 0")
    model = load_model(src)                       # verifies the manifest
    tmp = out.with_name(f".tmp-export-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf_dir(tmp, model.config.to_dict(), dict(model.named_params), max_shard_bytes=int(max_shard_mb * 2**20))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
            fsync_path(tmp / name)
    fsync_path(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    fsync_path(out.parent)
    return out


def export_gguf(checkpoint, out, kind: str = "f32") -> Path:
    from .checkpoint import find_checkpoint
    from .model import load_model
    from .model.gguf_io import write_gguf
    from .tokenizer import load_tokenizer

    src, out = find_checkpoint(checkpoint), Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: exists; export writes a new file")
    model = load_model(src)                       # verifies what it reads
    try:
        tok = load_tokenizer(src)
    except FileNotFoundError:
        tok = None
    template = None
    if (src / "tokenizer_config.json").is_file():
        import json
        template = json.loads((src / "tokenizer_config.json").read_text()).get("chat_template")
    return write_gguf(out, model.config, dict(model.named_params), kind, tok, template)


def run(args) -> int:
    from .checkpoint import CheckpointError
    from .model.hf_io import HFFormatError
    try:
        if args.format == "gguf":
            out = export_gguf(args.checkpoint, args.out, args.type)
        else:
            out = export(args.checkpoint, args.out, args.max_shard_mb)
    except (FileNotFoundError, FileExistsError, CheckpointError, HFFormatError, ValueError) as e:
        print(f"cke-dist export: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
