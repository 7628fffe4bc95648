"""Tokenizers: a tiny BPE `tokenizer.json` trained here, the byte tokenizer, streaming decode, bad dirs."""
import json

import pytest

from tiny import SENTENCES, make_tokenizer_dir

from cke_dist.formats.tokenizer import ByteTokenizer, HFTokenizer, TextStream, load_tokenizer





def test_hf_tokenizer_round_trip_and_specials(tmp_path):
    d = make_tokenizer_dir(tmp_path / "m")
    tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer)
    for text in SENTENCES + ["unseen words zebra ✓"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")   # merges were learned
    assert tok.eos_token_id == tok.token_to_id("</s>") == 1
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_token_id == 0


def test_eos_from_generation_config(tmp_path):
    d = make_tokenizer_dir(tmp_path / "m")
    (d / "tokenizer_config.json").unlink()
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 0]}))
    tok = load_tokenizer(d)
    assert tok.eos_token_id == 1 and tok.eos_token_ids == [1, 0]


def test_byte_tokenizer(tmp_path):
    (tmp_path / "cke_tokenizer.json").write_text('{"type": "bytes"}')
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.eos_token_id is None
    text = "héllo ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode()) and tok.decode(ids) == text
    assert tok.decode([104, 300, 105]) == "h\ufffdi"
    with pytest.raises(ValueError, match="negative"):
        tok.decode([-1])


@pytest.mark.parametrize("tokenizer_dir", ["bytes", "bpe"])
def test_text_stream_never_splits_a_character(tmp_path, tokenizer_dir):
    if tokenizer_dir == "bytes":
        (tmp_path / "cke_tokenizer.json").write_text('{"type": "bytes"}')
    else:
        make_tokenizer_dir(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "naïve — ✓ café"
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in tok.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_no_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*cke_tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "cke_tokenizer.json").write_text('{"type": "sentencepiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
