"""A GGUF file's tokenizer, rebuilt from its metadata with the `tokenizers` library the way
transformers builds it from the same file (formats/gguf.py's docstring says the rules: byte-level
BPE of `tokenizer.ggml.model = gpt2`, SentencePiece BPE of `llama`). Tests: tests/integration/test_gguf.py.
"""
from __future__ import annotations

from cke_dist.formats.gguf import GGUFError, field, open_reader

# The split regexes of the byte-level vocabularies whose `tokenizer.ggml.pre` names them (the
# pre-tokenizers of Llama 3's and Qwen2's tokenizer.json); any other name splits as GPT-2 does.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {**dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"], LLAMA3_SPLIT),
           **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], QWEN2_SPLIT)}
_UNSUPPORTED_SPLITS = {"tekken", "gpt-4o", "llama4", "qwen35", "minimax-m2"}


def gguf_tokenizer(path, reader=None):
    """(a `tokenizers.Tokenizer`, its end-of-sequence ids, its BOS id or None) rebuilt from the file's
    tokenizer metadata: byte-level BPE (`tokenizer.ggml.model = gpt2`) or SentencePiece BPE (`llama`).
    cke_dist.formats.tokenizer.load_tokenizer wraps it as an HFTokenizer."""
    r = reader or open_reader(path)
    kind = field(r, "tokenizer.ggml.model")
    tokens = field(r, "tokenizer.ggml.tokens")
    if kind in ("gpt2", "llama") and not tokens:
        raise GGUFError(f"{path}: tokenizer.ggml.model = {kind!r} but tokenizer.ggml.tokens is missing or empty")
    if kind == "gpt2":
        tok = _byte_level_bpe(path, r, list(tokens))
    elif kind == "llama":
        tok = _sentencepiece_bpe(path, r, list(tokens))
    else:
        raise GGUFError(f"{path}: tokenizer.ggml.model = {kind!r}; rebuilt from GGUF: 'gpt2' (byte-level BPE: "
                        f"Llama 3, Qwen2, SmolLM) and 'llama' (SentencePiece BPE: Llama 2, Mistral, TinyLlama)")
    eos = field(r, "tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    eot = field(r, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    bos = field(r, "tokenizer.ggml.bos_token_id")
    return tok, eos_ids, None if bos is None else int(bos)


def _byte_level_bpe(path, r, tokens: list[str]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    pre = field(r, "tokenizer.ggml.pre", "default")
    if pre in _UNSUPPORTED_SPLITS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre = {pre!r} is not supported")
    types = list(field(r, "tokenizer.ggml.token_type", []))
    merges = [tuple(m.split(" ")) for m in field(r, "tokenizer.ggml.merges", [])]
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # a token outside the byte alphabet (a special written as text) is spelled through it, as
    # transformers does, so the vocabulary keeps its size and ids
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [m for m in merges if len(m) == 2 and m[0] + m[1] in vocab]    # a merge to no token never applies
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    split = _SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) are specials matched whole; user-defined ones (4) plain added tokens
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                            if k == 3 and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                    if k == 4 and t in vocab])
    return tok


def _sentencepiece_bpe(path, r, tokens: list[str]):
    """SentencePiece BPE (Llama 2, Mistral, TinyLlama) as transformers rebuilds it from GGUF: BPE over
    the pieces with merges recovered from the scores (a GGUF stores none), `▁` for spaces, pieces
    <0x00>..<0xFF> for characters the vocabulary lacks."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    scores = field(r, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise GGUFError(f"{path}: a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token "
                        f"({len(tokens)}); got {'none' if scores is None else len(scores)}")
    types = list(field(r, "tokenizer.ggml.token_type", []))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = field(r, "tokenizer.ggml.merges")
    merges = [tuple(m.split(" ")) for m in merges] if merges else _spm_merges(vocab, dict(zip(tokens, scores)))
    unk = field(r, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk)] if unk is not None and 0 <= int(unk) < len(tokens) else None
    # a character with neither a piece nor byte pieces becomes <unk>, as in SentencePiece and
    # llama.cpp (transformers' rebuild drops it from the text instead); with byte pieces, as in every
    # Llama 2 / Mistral vocabulary, the byte fallback always wins and the two agree
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # llama.cpp prefixes a space unless the file says not to (tokenizer.ggml.add_space_prefix,
    # written from tokenizer_config's add_prefix_space); transformers' GGUF reader ignores the key
    # and always prefixes, so ids differ from it only on a file that sets it false
    prefix = bool(field(r, "tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)
    # specials matched whole in text: control tokens (type 3) and the ones the file names
    named = {field(r, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")} - {None}
    special = {i for i, k in enumerate(types) if k == 3} | {int(i) for i in named if 0 <= int(i) < len(tokens)}
    tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in sorted(special)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for i, (t, k) in enumerate(zip(tokens, types))
                    if k == 4 and i not in special])
    return tok


def _spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a piece into two pieces,
    ranked by the piece's score (higher first; ties: the longer left piece, then the longer right
    one, then the order of the pieces) -- exactly transformers' generate_merges order, since with
    tied scores (bytes, controls) the order decides which pair merges first."""
    found = []
    for piece, score in scores.items():
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found += [(a, b, score) for a, b in pairs]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes that print stand for themselves; the others
    are shifted past 255), the alphabet byte-level BPE vocabularies are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out
