"""Tokenizers for a model directory: Hugging Face `tokenizer.json`, or raw bytes.

Rules it keeps:
- `tokenizer.json` (the `tokenizers` library) wins when present; a directory of
  our own byte-trained model carries `cke_tokenizer.json` = {"type": "bytes"}.
  Neither -> FileNotFoundError naming the directory and both files.
- encode never adds special tokens (no BOS) unless asked: generation feeds the
  prompt exactly as the user wrote it; `add_bos=True` prepends the BOS the
  directory names.
- the end-of-sequence id comes from tokenizer_config.json (eos_token), then
  generation_config.json / config.json (eos_token_id); None when none is named.
- byte ids past 255 (a padded vocab) decode to U+FFFD.
- `tokenizer_files(source)` is what travels with every checkpoint and export of a model started
  from `source`: the tokenizer files of a directory as they are (chat templates included), or, for
  a GGUF file, the tokenizer rebuilt from its metadata as tokenizer.json plus a
  tokenizer_config.json naming its specials and chat template, so transformers and we load it alike.
- TextStream turns ids into text pieces as they arrive without splitting a
  multi-byte character: it holds back text that ends in an unfinished one. Given
  the prompt's ids it prints what the new ids add to the prompt's text (a
  SentencePiece continuation keeps its leading space).
Tests: tests/unit/test_tokenizer.py.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cke_dist.formats.architectures import TOKENIZER_FILES
from cke_dist.formats.gguf import gguf_chat_template, gguf_special_tokens, is_gguf, missing_model
from cke_dist.formats.gguf_tokenizer import gguf_tokenizer

BYTES_FILE = "cke_tokenizer.json"
HF_FILE = "tokenizer.json"


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes of the text; no special tokens."""

    vocab_size = 256
    eos_token_id = None
    bos_token_id = None
    eos_token_ids: list[int] = []

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        # ids past 255 exist when a byte model's vocab_size was padded beyond 256; they have no
        # text, so they show as U+FFFD like any other undecodable input (the ids are unchanged)
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if i < 0:
                raise ValueError(f"byte tokenizer: negative token id {i}")
            out.append(run.decode("utf-8", errors="replace") + "\ufffd")
            run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` library."""

    def __init__(self, path: Path, eos_token_ids: list[int], bos_token_id: int | None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:   # an optional dependency: say how to get it
            raise ImportError(f"{path} needs the `tokenizers` package: pip install 'cke-dist[inference]'") from e
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from e
        self.eos_token_ids = eos_token_ids
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else None
        self.bos_token_id = bos_token_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_tokenizer(cls, tok, eos_token_ids: list[int], bos_token_id: int | None, source: str) -> "HFTokenizer":
        """One around a `tokenizers.Tokenizer` built elsewhere (e.g. from a GGUF file's metadata)."""
        self = cls.__new__(cls)
        self._tok = tok
        self.eos_token_ids = eos_token_ids
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else None
        self.bos_token_id = bos_token_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.source = source
        return self

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:   # the library's own error ("TextInputSequence must be str") hides why
            raise ValueError(f"the text is not valid Unicode: a lone surrogate U+{ord(text[e.start]):04X} at "
                             f"character {e.start} (text that was not UTF-8?)") from None
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True but the model directory names no BOS token")
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode_with_offsets(self, text: str) -> list[tuple[int, int]]:
        """(id, offset of the token's first character in text) of each token."""
        e = self._tok.encode(text, add_special_tokens=False)
        return [(i, a) for i, (a, _) in zip(e.ids, e.offsets)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (the `tokenizers` library spreads them over its threads)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def fingerprint(self) -> str:
        """sha256 of everything that decides the ids: the tokenizer itself and its EOS/BOS."""
        h = hashlib.sha256(self._tok.to_str().encode())
        h.update(json.dumps([self.eos_token_ids, self.bos_token_id]).encode())
        return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _special_id(tok: HFTokenizer, value) -> int | None:
    """tokenizer_config.json names special tokens as strings or {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        return tok.token_to_id(value)
    return None


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def load_tokenizer(model_dir) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of a model directory, or of a GGUF file (rebuilt from its metadata)."""
    if is_gguf(model_dir):
        tok, eos_ids, bos = gguf_tokenizer(model_dir)
        return HFTokenizer.from_tokenizer(tok, eos_ids, bos, source=str(model_dir))
    d = Path(model_dir)
    if not d.is_dir():
        raise missing_model(d)
    hf, ours = d / HF_FILE, d / BYTES_FILE
    if hf.is_file():
        tok = HFTokenizer(hf, [], None)
        eos, bos = [], None
        tc = d / "tokenizer_config.json"
        if tc.is_file():
            cfg = _read_json(tc)
            e = _special_id(tok, cfg.get("eos_token"))
            eos = [e] if e is not None else []
            bos = _special_id(tok, cfg.get("bos_token"))
        for name in ("generation_config.json", "config.json"):
            f = d / name
            if f.is_file():
                cfg = _read_json(f)
                eos += [i for i in _ids(cfg.get("eos_token_id")) if i not in eos]
                if bos is None and isinstance(cfg.get("bos_token_id"), int):
                    bos = cfg["bos_token_id"]
        tok.eos_token_ids, tok.eos_token_id, tok.bos_token_id = eos, (eos[0] if eos else None), bos
        return tok
    if ours.is_file():
        spec = _read_json(ours)
        if spec.get("type") != "bytes":
            raise ValueError(f"{ours}: unknown tokenizer type {spec.get('type')!r}; supported: \"bytes\"")
        return ByteTokenizer()
    raise FileNotFoundError(
        f"no tokenizer in {d}: expected {HF_FILE} (Hugging Face) or {BYTES_FILE} "
        f"(our byte-level models: {{\"type\": \"bytes\"}}); copy the tokenizer files next to the weights")


def chat_template_source(source) -> str | None:
    """The chat template's text (None: there is none): a GGUF file's `tokenizer.chat_template`, a
    directory's chat_template.jinja (what transformers >= 4.43 writes), or else its
    tokenizer_config.json "chat_template" (a string, or a list of {name, template}: "default")."""
    if is_gguf(source):
        return gguf_chat_template(source) or None
    d = Path(source)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8") or None
    tc = d / "tokenizer_config.json"
    source = _read_json(tc).get("chat_template") if tc.is_file() else None
    if isinstance(source, list):   # named templates (e.g. "default", "tool_use"): chat uses the default
        source = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}.get("default")
    return source if isinstance(source, str) and source else None


def tokenizer_files(source) -> dict[str, bytes]:
    """{file name: content} of the tokenizer a model directory or GGUF file carries ({} for none)."""
    if is_gguf(source):
        tok, eos_ids, bos = gguf_tokenizer(source)
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        cfg.update(gguf_special_tokens(source))
        template = gguf_chat_template(source)
        if template:
            cfg["chat_template"] = template
        return {HF_FILE: tok.to_str().encode(), "tokenizer_config.json": (json.dumps(cfg, indent=2) + "\n").encode()}
    d = Path(source)
    return {name: (d / name).read_bytes() for name in TOKENIZER_FILES if (d / name).is_file()}


class TextStream:
    """Incremental decode: `push(id)` returns the new text that is safe to print now.

    `context`: the ids before these (the prompt). The text is what they add to the context's, so a
    first token "▁Paris" after "is" prints " Paris": SentencePiece decoders strip the space of a
    sequence's first piece, which is right for a whole text and wrong for a continuation."""

    def __init__(self, tokenizer, context=()):
        self.tok = tokenizer
        self.context = _context_tail(tokenizer, [int(i) for i in context])
        self.ids: list[int] = []
        self.emitted = len(tokenizer.decode(self.context)) if self.context else 0   # characters returned

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.context + self.ids)
        # an unfinished UTF-8 sequence decodes to U+FFFD at the end: wait for its next bytes
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.context + self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new


def _context_tail(tokenizer, context: list[int], keep: int = 8) -> list[int]:
    """The context a stream decodes with: the last few ids (a whole prompt, decoded again with every
    token, would cost O(prompt) a token); all of them when that tail starts inside a character
    (U+FFFD), since a byte-fallback decoder turns a run of byte pieces that is not UTF-8 as a whole
    into U+FFFDs, so new bytes must see their run from its start; none when the prompt itself ends
    inside a character (ids given as the prompt): new bytes would complete it within the prompt's
    text, so the new ids are decoded alone."""
    tail = context[-keep:]
    text = tokenizer.decode(tail) if tail else ""
    if text.endswith("\ufffd"):
        return []
    if len(tail) < len(context) and "\ufffd" in text:
        return context
    return tail


class StopText:
    """Holds back streamed text that might be the start of a stop string; cuts at the first match."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                self.hit, out, self.pending = True, self.pending[:i], ""
                return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
