"""Conversions that go through the model: a checkpoint to a Hugging Face directory or a GGUF
file (a LoRA checkpoint's adapters merged into its base), or its adapters alone as PEFT's adapter
directory; a float model to a quantized directory. Each writes the tokenizer files the source carries
(cke_dist.formats.architectures.TOKENIZER_FILES, chat templates included).
Tests: tests/integration/test_export.py, tests/integration/test_gguf.py, tests/unit/test_q8_0.py.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from cke_dist.formats.architectures import TOKENIZER_FILES
from cke_dist.formats.checkpoint import find_checkpoint
from cke_dist.formats.gguf_write import write_gguf
from cke_dist.formats.hf import fsync_path, open_hf_tensors, verify_manifest, write_hf_dir, write_safetensors
from cke_dist.formats.gguf import is_gguf
from cke_dist.formats.tokenizer import chat_template_source, load_tokenizer, tokenizer_files
from cke_dist.model.load import load_inference_model, load_model, save_quantized
from cke_dist.model.lora import ADAPTER_CONFIG, ADAPTER_STEM


def _source(path) -> Path:
    """A GGUF file as it is; a checkpoint, or a run directory's newest one."""
    return Path(path) if is_gguf(path) else find_checkpoint(path)


def _write_dir(out: Path, fill) -> Path:
    """A new directory `out`, filled by fill(tmp) beside it, every file fsynced, then renamed into
    place: never half there."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; export writes a new directory")
    tmp = out.with_name(f".tmp-export-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    for p in tmp.iterdir():
        fsync_path(p)
    fsync_path(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    fsync_path(out.parent)
    return out


def _write_files(d: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (d / name).write_bytes(data)


def export_hf(checkpoint, out, max_shard_mb: float = 2048.0) -> Path:
    """A checkpoint (or a run directory's newest, or a GGUF file) as a plain HF directory with its
    tokenizer, written beside `out` and renamed into place so it is never half there."""
    src, out = _source(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; export writes a new directory")
    if not max_shard_mb > 0:
        raise ValueError(f"--max-shard-mb {max_shard_mb}: must be > 0")
    model = load_model(src)                       # verifies the manifest

    def fill(tmp):
        write_hf_dir(tmp, model.config.to_dict(), dict(model.named_params), max_shard_bytes=int(max_shard_mb * 2**20))
        _write_files(tmp, tokenizer_files(src))
    return _write_dir(out, fill)


def export_peft(checkpoint, out) -> Path:
    """A LoRA checkpoint's adapters as PEFT's adapter directory (adapter_config.json naming the base,
    adapter_model.safetensors with whole tensors), whatever layout wrote it; with the tokenizer."""
    src, out = find_checkpoint(checkpoint), Path(out)
    if not (src / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{src}: not a LoRA checkpoint (no {ADAPTER_CONFIG}); export it with --format hf or gguf")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; export writes a new directory")
    verify_manifest(src)
    tensors = open_hf_tensors(src)

    def fill(tmp):
        write_safetensors({name: tensors.read(name) for name in sorted(tensors)},
                          tmp / f"{ADAPTER_STEM}.safetensors", metadata={"format": "pt"})
        _write_files(tmp, {ADAPTER_CONFIG: (src / ADAPTER_CONFIG).read_bytes(), **tokenizer_files(src)})
    return _write_dir(out, fill)


def export_gguf(checkpoint, out, kind: str = "f32") -> Path:
    """A checkpoint (or a GGUF file) as one GGUF file with its tokenizer and chat template
    (formats.gguf_write.write_gguf); a source with no tokenizer is refused, not given a made-up one."""
    src, out = _source(checkpoint), Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: exists; export writes a new file")
    tok = load_tokenizer(src)                     # FileNotFoundError names what is missing
    model = load_model(src)                       # verifies what it reads
    return write_gguf(out, model.config, dict(model.named_params), kind, tok, chat_template_source(src))


def quantize_dir(model_dir, out_dir, kind: str = "q8_0") -> dict:
    """Quantize model_dir into out_dir; returns {"float32_bytes", "quantized_bytes"} of the weights read per token."""
    if os.path.abspath(model_dir) == os.path.abspath(out_dir):
        raise ValueError(f"--out {out_dir} is the input directory; write the {kind.upper()} copy somewhere else")
    f32 = load_inference_model(model_dir)
    if f32.quantize is not None:
        raise ValueError(f"{model_dir} is already a {f32.quantize.upper()} directory; quantize the float one")
    q = f32.to_quantized(kind)
    save_quantized(q, out_dir)
    for name in TOKENIZER_FILES:
        src = os.path.join(model_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
    return {"float32_bytes": f32.weight_bytes_per_token(), "quantized_bytes": q.weight_bytes_per_token()}
