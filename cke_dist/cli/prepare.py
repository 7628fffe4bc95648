"""`cke-dist prepare --model MODEL --data PATH [--out FILE.u32]`: tokenize a text corpus with the
model's tokenizer ahead of training (cke_dist.train.data.prepare_tokens), into the cache that
`cke-dist train` with the same model and data then finds, or into a token file of its own."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from cke_dist.formats.checkpoint import model_path
from cke_dist.formats.tokenizer import load_tokenizer
from cke_dist.train.data import DOCUMENTS, DataError, data_files, prepare_tokens, resolve_format


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="the model whose tokenizer reads the text: an HF directory, a "
                   "checkpoint or a GGUF file")
    p.add_argument("--data", required=True, help="a .txt/.md/.jsonl file, a directory of them, or a glob")
    p.add_argument("--format", default="auto", choices=["auto", *DOCUMENTS], help="text or jsonl (default: by suffix)")
    p.add_argument("--out", help="also write the ids here as a .u32 file (data.path = OUT, data.format = u32)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    try:
        files = data_files(args.data)
        kinds = {resolve_format(f, args.format) for f in files}
        if not kinds <= set(DOCUMENTS) or len(kinds) > 1:
            raise DataError(f"{args.data}: prepare reads one kind of text ({', '.join(DOCUMENTS)}); found "
                            f"{sorted(kinds)}")
        tok = load_tokenizer(model_path(args.model))
        if not hasattr(tok, "fingerprint"):
            raise DataError(f"{args.model}: a byte-level model reads text as its bytes; there is nothing to prepare")
        path = prepare_tokens(files, kinds.pop(), tok, progress=not args.no_progress)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"cke-dist prepare: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        shutil.copyfile(path, args.out)
        path = Path(args.out)
    print(f"{path}: {path.stat().st_size // 4:,} tokens from {len(files)} file(s)")
    return 0
