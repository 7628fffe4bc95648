"""GGUF in and out: every listed tensor type read as transformers' GGUF loader reads it, our export
read back by transformers with the same logits, and SmolLM2-135M (a real GGUF) against transformers:
tokenizer ids and greedy text."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mpirun import REPO, threads_env

from cke_dist.formats.gguf import GGUFError
from cke_dist.formats.gguf_write import write_gguf  # noqa: E402
from cke_dist.model import LlamaConfig, Model, load_model  # noqa: E402
from cke_dist.model.layout import LM_HEAD  # noqa: E402

T = gguf.GGMLQuantizationType
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def tokens(vocab, n=10, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (1, n))


def ours_vs_hf_logits(path: Path, vocab: int) -> float:
    x = tokens(vocab)
    with torch.no_grad():
        ref = hf_model(path)(torch.from_numpy(x)).logits.numpy()
    got = load_model(path).forward(x)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind, tol", [("f32", 1e-7), ("f16", 2e-3), ("q8_0", 2e-2), ("q4_0", 0.3)])
def test_export_reads_back_in_transformers_and_in_ours(tmp_path, arch, kind, tol):
    """Our writer -> our reader: the tensors within the type's rounding; transformers' GGUF loader
    on the same file gives our logits (q/k permuted for llama.cpp and back, names, config)."""
    extra = dict(model_type="qwen2", tie_word_embeddings=False, attention_bias=True) if arch == "qwen2" \
        else dict(tie_word_embeddings=True)
    model = Model.from_config(LlamaConfig.from_dict(dict(SMALL, **extra)), seed=0, init_std=0.1)
    path = write_gguf(tmp_path / f"m-{kind}.gguf", model.config, dict(model.named_params), kind)
    back = load_model(path)
    assert back.config.to_dict() == model.config.to_dict()
    for name, t in model.named_params.items():
        scale = np.abs(t).max()
        assert np.abs(back.named_params[name] - t).max() <= tol * scale + 1e-7, (name, kind)
    assert ours_vs_hf_logits(path, SMALL["vocab_size"]) < 1e-5


def _raw_kquant(rows, cols, qtype, rng):
    """Random blocks of a K-quant type with sane fp16 super-block scales (gguf's Python package
    cannot quantize K-quants, but reads them, as llama.cpp writes them)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    if qtype == T.Q6_K:
        raw[..., size - 2:] = d
    else:                        # Q4_K / Q5_K: d, then dmin
        raw[..., 0:2] = d
        raw[..., 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def test_every_tensor_type_reads_as_transformers_reads_it(tmp_path):
    """F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K in one file: our float32 tensors equal the
    ones transformers' GGUF loader dequantizes (both through gguf's reference dequantization)."""
    cfg = LlamaConfig.from_dict(dict(SMALL, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                     tie_word_embeddings=False))
    model = Model.from_config(cfg, seed=1, init_std=0.05)
    path = tmp_path / "types.gguf"
    write_gguf(path, cfg, dict(model.named_params), "f32")
    # rewrite with one type per tensor
    src = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "mixed.gguf"), "llama")
    for f in src.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    kinds = {"token_embd": T.BF16, "attn_q": T.Q4_K, "attn_k": T.Q5_K, "attn_v": T.Q6_K, "attn_output": T.Q8_0,
             "ffn_gate": T.Q4_0, "ffn_up": T.Q4_1, "ffn_down": T.F16, "output.": T.Q6_K}
    rng = np.random.default_rng(0)
    used = set()
    for t in src.tensors:
        data = np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))
        qtype = next((q for k, q in kinds.items() if k in t.name), None) if data.ndim == 2 else None
        if qtype is None:
            w.add_tensor(t.name, np.ascontiguousarray(data))
        elif qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
            w.add_tensor(t.name, _raw_kquant(*data.shape, qtype, rng), raw_dtype=qtype)
        else:
            q = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
            w.add_tensor(t.name, q, raw_dtype=qtype)
        used.add(qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert {T.BF16, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.F16} <= used
    ours = load_model(tmp_path / "mixed.gguf")
    ref = hf_model(tmp_path / "mixed.gguf").state_dict()
    for name, t in ours.named_params.items():
        np.testing.assert_allclose(t, ref[name].numpy(), rtol=0, atol=1e-6 * max(1.0, float(np.abs(t).max())),
                                   err_msg=name)
    assert np.abs(ours.named_params["model.layers.0.self_attn.q_proj.weight"]).max() > 0


def test_an_unsupported_type_or_architecture_is_named(tmp_path):
    model = Model.from_config(LlamaConfig.from_dict(SMALL), seed=0)
    w = gguf.GGUFWriter(str(tmp_path / "q5.gguf"), "llama")
    path = write_gguf(tmp_path / "ok.gguf", model.config, dict(model.named_params), "f32")
    src = gguf.GGUFReader(str(path))
    for f in src.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in src.tensors:
        data = np.ascontiguousarray(np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))))
        if t.name == "blk.1.ffn_up.weight":
            w.add_tensor(t.name, gguf.quants.quantize(data, T.Q5_0), raw_dtype=T.Q5_0)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="blk.1.ffn_up.weight has type Q5_0; supported: F32, F16, BF16, Q8_0"):
        load_model(tmp_path / "q5.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 40)
    with pytest.raises(GGUFError, match="junk.gguf: not a readable GGUF file"):
        load_model(tmp_path / "junk.gguf")


def test_export_command_and_generate_from_the_gguf(tmp_path):
    """cke-dist export CKPT OUT.gguf --format gguf --type q8_0, then cke-dist generate --model OUT.gguf:
    the text equals generate on the same dequantized weights."""
    from cke_dist.formats.checkpoint import Shard, save_checkpoint
    from cke_dist.formats.tokenizer import ByteTokenizer
    from cke_dist.serving.generate import generate

    model = Model.from_config(LlamaConfig.from_dict(dict(SMALL, vocab_size=256)), seed=3, init_std=0.2)
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, model.config, Shard(0, 1, model.specs, model.params), {}, {"cke_tokenizer.json": b'{"type": "bytes"}\n'})
    out = tmp_path / "model.gguf"
    env = threads_env()
    r = subprocess.run([sys.executable, "-m", "cke_dist.cli", "export", str(ckpt), str(out), "--format", "gguf",
                        "--type", "q8_0"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and out.is_file(), r.stderr
    back = load_model(out)
    want = ByteTokenizer().decode(generate(back, list(b"hi"), 8, temperature=0))
    r = subprocess.run([sys.executable, "-m", "cke_dist.cli", "generate", "--model", str(out), "--prompt", "hi",
                        "--max-new-tokens", "8", "--temperature", "0"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hi" + want + "\n"
    r = subprocess.run([sys.executable, "-m", "cke_dist.cli", "export", str(ckpt), str(out), "--format", "gguf"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "exists" in r.stderr


# ---- SmolLM2-135M-Instruct, a real GGUF (Q4_1 with a Q8_0 embedding): conftest's smollm2 fixture ------


TEXTS = ["The capital of France is", "  leading spaces and trailing  ", "digits 1234567 and 3.14159, 42nd",
         "unicode: café naïve 日本語 emoji 🙂 ñ", "<|im_start|>user\nHi there!<|im_end|>\n", "tabs\tand\nnewlines\r\n",
         "don't you'll we're I'M", ""]


def test_smollm2_tokenizer_ids_equal_transformers(smollm2):
    from cke_dist.formats.tokenizer import load_tokenizer
    ours = load_tokenizer(smollm2)
    ref = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.eos_token_ids == [2] and ours.bos_token_id == 1


def test_smollm2_greedy_text_and_logits_equal_transformers(smollm2):
    from cke_dist.formats.tokenizer import load_tokenizer
    from cke_dist.serving.generate import generate
    tok = load_tokenizer(smollm2)
    ids = tok.encode("The capital of France is")
    ours = load_model(smollm2)
    hf = hf_model(smollm2)
    with torch.no_grad():
        ref_logits = hf(torch.tensor([ids])).logits.numpy()
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    got_logits = ours.forward(np.array([ids]))
    assert np.abs(got_logits - ref_logits).max() < 2e-4 * np.abs(ref_logits).max()
    got = generate(ours, ids, 12, temperature=0)
    assert got == ref
    assert tok.decode(got).startswith(" Paris.")


def test_smollm2_stays_4bit_and_close_to_its_float32(smollm2):
    """Inference on the GGUF keeps its Q4_1 and Q8_0 blocks (about 106 MiB read per token, not 540);
    its logits stay close to the dequantized float32 model's and the first token is the same."""
    from cke_dist.formats.tokenizer import load_tokenizer
    from cke_dist.model.inference import InferenceModel
    from cke_dist.model.load import load_inference_model
    tok = load_tokenizer(smollm2)
    ids = tok.encode("The capital of France is")
    native = load_inference_model(smollm2)
    f32 = InferenceModel.from_model(load_model(smollm2))
    assert native.quantize == "q4_1" and native.embed_q.kind == "q8_0"
    assert native.weight_bytes_per_token() < 0.25 * f32.weight_bytes_per_token()
    a = native.prefill(native.new_cache(1, 8), 0, ids, all_logits=True)
    b = f32.prefill(f32.new_cache(1, 8), 0, ids, all_logits=True)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99 and np.argmax(a[-1]) == np.argmax(b[-1]), cos
    assert tok.decode([int(np.argmax(a[-1]))]) == " Paris"


def test_smollm2_chat_template_renders_as_transformers_renders_it(smollm2):
    from cke_dist.serving.chat import load_chat_template
    ref = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    assert load_chat_template(smollm2).render(msgs) == ref.apply_chat_template(msgs, tokenize=False,
                                                                               add_generation_prompt=True)


def test_llama_cpp_runs_our_export(tmp_path):
    """Where llama-cpp-python is installed (not in CI: it builds llama.cpp for ~25 minutes), llama.cpp
    loads our f32 export, byte tokenizer included, and its logits are ours."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from cke_dist.formats.tokenizer import ByteTokenizer
    model = Model.from_config(LlamaConfig.from_dict(dict(SMALL, vocab_size=256)), seed=2, init_std=0.2)
    path = write_gguf(tmp_path / "m.gguf", model.config, dict(model.named_params), "f32", ByteTokenizer())
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, verbose=False, logits_all=True)
    ids = list(b"hello")
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    ours = load_model(path).forward(np.array([ids]))[0]
    assert np.abs(theirs - ours).max() < 2e-3 * np.abs(ours).max()
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    assert llm.tokenize(b"hello", add_bos=False, special=False) == ids


# ---- SentencePiece vocabularies (tokenizer.ggml.model = llama: Llama 2, Mistral, TinyLlama) ---------

SHAKESPEARE = REPO / "examples" / "data" / "tinyshakespeare.txt"
SPM_SPECIALS = ["<|im_start|>", "<|im_end|>"]         # control pieces (type 3), like Llama 2's <s>, </s>
SPM_USER = ["<think>"]                                # a user-defined piece (type 4)
LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] "
                   "+ ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def _train_spm(byte_fallback=True, dummy_prefix=True, vocab=600):
    """A SentencePiece BPE model trained with Llama 2's settings on Shakespeare (~0.1 s)."""
    import io
    spm = pytest.importorskip("sentencepiece")
    lines = SHAKESPEARE.read_text(encoding="utf-8")[:300_000].splitlines()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab,
        byte_fallback=byte_fallback, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        add_dummy_prefix=dummy_prefix, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=SPM_SPECIALS,
        user_defined_symbols=SPM_USER, minloglevel=2, num_threads=1)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def _spm_gguf(path: Path, sp, model=None, add_space_prefix=None, chat_template=None) -> Path:
    """A llama GGUF with this SentencePiece vocabulary, its metadata as llama.cpp's converter writes
    it (pieces, scores, types 1 normal / 2 unknown / 3 control / 4 user-defined / 6 byte), and a
    tiny model's tensors (random ones of the vocabulary's size when none is given)."""
    n = sp.vocab_size()
    if model is None:
        model = Model.from_config(LlamaConfig.from_dict(dict(SMALL, vocab_size=n)), seed=0, init_std=0.1)
    plain = write_gguf(path.with_name(f"plain-{path.name}"), model.config, dict(model.named_params), "f32")
    src = gguf.GGUFReader(str(plain))
    w = gguf.GGUFWriter(str(path), "llama")
    for f in src.fields.values():
        if not f.name.startswith(("GGUF.", "tokenizer.", "general.architecture")):
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)

    def kind(i):
        piece = sp.IdToPiece(i)
        return (2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i)
                else 4 if piece in SPM_USER else 1)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.IdToPiece(i) for i in range(n)])
    w.add_token_scores([sp.GetScore(i) for i in range(n)])
    w.add_token_types([kind(i) for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    if chat_template:
        w.add_chat_template(chat_template)
    for t in src.tensors:
        w.add_tensor(t.name, np.ascontiguousarray(np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPM_TEXTS = ["ROMEO: But soft, what light through yonder window breaks?", "Hello world", "  leading spaces",
             " one leading space", "trailing  ", "multiple   spaces\tand\ttabs", "lines\n\nand\r\nreturns\n",
             "digits 1234567 and 3.14159, 42nd", "café naïve ÆØÅ ß façade", "日本語のテキスト", "emoji 🙂🎉 ok",
             "<s>a</s> b<|im_start|>user\nHi<|im_end|>\n", "x<think>why</think>", "<unk> and </s>", "", " ", "\n",
             "ÿ\x00\x7f control bytes", "zzzzzzzzzzqqqqqqqq"]


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    sp = _train_spm()
    return sp, _spm_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", sp, chat_template=LLAMA2_TEMPLATE)


def test_sentencepiece_tokenizer_ids_and_text_equal_transformers(spm_file):
    """Ids, decoded text, BOS/EOS, special tokens and the chat template of a SentencePiece GGUF equal
    transformers' tokenizer loaded from the same file; where transformers follows SentencePiece (no
    leading space, no special tokens in the text) the ids are SentencePiece's own."""
    from cke_dist.formats.gguf import gguf_special_tokens
    from cke_dist.formats.tokenizer import TextStream, load_tokenizer
    from cke_dist.serving.chat import load_chat_template
    sp, path = spm_file
    ours = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    rng = np.random.default_rng(0)
    words = SHAKESPEARE.read_text(encoding="utf-8")[600_000:700_000].split()
    texts = SPM_TEXTS + [" ".join(rng.choice(words, 12)) + rng.choice(["", " é", "中", "🙂", "\n"]) for _ in range(100)]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids), text
        if not text.startswith(" "):     # a leading space is one piece "▁" that decoding strips
            assert ours.decode(ids) == text
        if not text.startswith(" ") and not any(s in text for s in ["<s>", "</s>", "<unk>", *SPM_SPECIALS]):
            assert ids == sp.encode(text), text
        assert ours.encode(text, add_bos=True) == ref.encode(text), text     # the file asks for BOS
    byte_ids = lambda text: [sp.PieceToId(f"<0x{b:02X}>") for b in text.encode()]  # noqa: E731
    assert ours.encode("a 🙂")[-4:] == byte_ids("🙂")
    # streaming after a prompt that ends in byte pieces: the bytes of 本 join a run that starts inside
    # the stream's context tail, which alone is no UTF-8 (the stream must look further back)
    context = ours.encode("x 🙂日日")
    stream = TextStream(ours, context=context)
    assert "".join(stream.push(i) for i in byte_ids("本") + ours.encode("end")) + stream.flush() == "本 end"
    assert ref.decode(context + byte_ids("本") + ours.encode("end")) == "x 🙂日日本 end"
    for _ in range(50):      # any id sequence, bytes that are no UTF-8 and specials included
        ids = rng.integers(0, sp.vocab_size(), 12).tolist()
        assert ours.decode(ids) == ref.decode(ids), ids
    assert ours.bos_token_id == 1 and ours.eos_token_ids == [2] and ours.vocab_size == sp.vocab_size()
    assert gguf_special_tokens(path) == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "And now?"}]
    prompt = load_chat_template(path).render(msgs)
    assert prompt == ref.apply_chat_template(msgs, tokenize=False) == "<s>[INST] Hi there [/INST] Hello.</s>[INST] And now? [/INST]"
    assert ours.encode(prompt) == ref.encode(prompt, add_special_tokens=False)


def test_sentencepiece_without_space_prefix_or_byte_pieces_follows_sentencepiece(tmp_path):
    """Where transformers' GGUF reader departs from the file, ours follows SentencePiece (and llama.cpp
    where installed): tokenizer.ggml.add_space_prefix = false prefixes no "▁" (transformers ignores
    the key), and a character with neither a piece nor byte pieces is <unk> (transformers drops it)."""
    from cke_dist.formats.tokenizer import load_tokenizer
    texts = ["Hello world", "ROMEO: But soft", "a\nb  c", "digits 123"]
    sp = _train_spm(dummy_prefix=False)
    path = _spm_gguf(tmp_path / "noprefix.gguf", sp, add_space_prefix=False)
    ours = load_tokenizer(path)
    for text in texts:
        assert ours.encode(text) == sp.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("Hello")[0] != load_tokenizer(_spm_gguf(tmp_path / "prefix.gguf", _train_spm())).encode("Hello")[0]
    sp = _train_spm(byte_fallback=False, vocab=300)
    ours = load_tokenizer(_spm_gguf(tmp_path / "nobytes.gguf", sp))
    assert ours.encode("to 日 be") == sp.encode("to 日 be") and sp.unk_id() in sp.encode("to 日 be")
    try:
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == load_tokenizer(path).encode(text)


def test_generate_prints_the_sentencepiece_text(tmp_path):
    """cke-dist generate on a GGUF with a SentencePiece vocabulary: the printed text is the prompt and
    the continuation as transformers decodes prompt + new ids, its leading "▁" kept as a space
    (decoding the new ids alone would strip it)."""
    from cke_dist.formats.tokenizer import load_tokenizer
    from cke_dist.serving.generate import generate
    sp = _train_spm()
    model = Model.from_config(LlamaConfig.from_dict(dict(SMALL, vocab_size=sp.vocab_size(), tie_word_embeddings=False)),
                              seed=4, init_std=0.3)
    # only a few words can win, each a piece that starts with "▁"
    words = [sp.PieceToId(p) for p in ["▁the", "▁and", "▁my", "▁of", "▁to"]]
    head = model.named_params[LM_HEAD]
    keep = head[words].copy()
    head[:] = 0
    head[words] = keep
    path = _spm_gguf(tmp_path / "spm-model.gguf", sp, model)
    tok = load_tokenizer(path)
    prompt = "ROMEO: But soft, café"
    ids = tok.encode(prompt)
    new = generate(load_model(path), ids, 6, temperature=0)
    assert all(t in words for t in new)
    env = threads_env()
    r = subprocess.run([sys.executable, "-m", "cke_dist.cli", "generate", "--model", str(path), "--prompt", prompt,
                        "--max-new-tokens", "6", "--temperature", "0"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert r.stdout == ref.decode(ids + new) + "\n"
    assert r.stdout.startswith(prompt + " ") and len(r.stdout.split()) == len(prompt.split()) + 6


# ---- RoPE scaling ---------------------------------------------------------------------------------

ROPE_SMALL = dict(SMALL, vocab_size=256, max_position_embeddings=64)


def _rewrite(src: Path, dst: Path, drop=(), add=None) -> Path:
    """A copy of a GGUF file without the keys in `drop`, plus the keys add(writer) writes."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "llama")
    for f in r.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture" and f.name not in drop:
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    if add:
        add(w)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.ascontiguousarray(np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _hf_logits(config: dict, model, x) -> np.ndarray:
    """transformers' LlamaForCausalLM with this config dict and our weights."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float().eval()
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.named_params.items()}
    hf.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return hf(torch.from_numpy(x)).logits.numpy()


@pytest.mark.parametrize("rope", [dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16),
                                  dict(factor=3.0, low_freq_factor=0.5, high_freq_factor=5.0,
                                       original_max_position_embeddings=24)])
def test_llama3_rope_scaling_round_trips(tmp_path, rope):
    """Llama 3 RoPE scaling exported as llama.cpp's converter writes it (rope_freqs.weight) reads back
    as the same config and logits, which are transformers' for that config; without the original
    context length (llama.cpp's converter does not write it) the parameters are solved from the
    divisors, and the logits stay the same up to rounding."""
    from cke_dist.formats.gguf import gguf_config
    model = Model.from_config(LlamaConfig.from_dict(dict(ROPE_SMALL, rope_scaling={"rope_type": "llama3", **rope})),
                              seed=0, init_std=0.2)
    path = write_gguf(tmp_path / "rope.gguf", model.config, dict(model.named_params), "f32")
    assert any(t.name == "rope_freqs.weight" for t in gguf.GGUFReader(str(path)).tensors)
    back = load_model(path)
    assert back.config.to_dict() == model.config.to_dict()
    x = tokens(256, 48)
    want = model.forward(x)
    assert np.abs(back.forward(x) - want).max() <= 1e-6 * np.abs(want).max()
    assert np.abs(_hf_logits(model.config.to_dict(), model, x) - want).max() <= 1e-5 * np.abs(want).max()
    plain = Model.from_config(LlamaConfig.from_dict(ROPE_SMALL), seed=0, init_std=0.2)
    assert np.abs(plain.forward(x) - want).max() > 1e-2 * np.abs(want).max()      # the scaling shows
    bare = _rewrite(path, tmp_path / "bare.gguf", drop={"llama.rope.scaling.original_context_length"})
    solved = gguf_config(bare)["rope_scaling"]
    assert solved["low_freq_factor"] == 1.0 and solved["factor"] == rope["factor"]
    # equivalent parameters, the blend computed through them: float32 rounding apart
    assert np.abs(load_model(bare).forward(x) - want).max() <= 1e-5 * np.abs(want).max()


def test_linear_rope_scaling_reads_as_llama_cpp_applies_it(tmp_path):
    """rope.scaling.type = linear (or a factor with no type, which llama.cpp takes as linear) divides
    every frequency by the factor: our logits equal transformers' linear RoPE on the same weights;
    type none ignores the factor; our export writes it back as linear."""
    from cke_dist.formats.gguf import gguf_config
    model = Model.from_config(LlamaConfig.from_dict(ROPE_SMALL), seed=1, init_std=0.2)
    plain = write_gguf(tmp_path / "plain.gguf", model.config, dict(model.named_params), "f32")
    x = tokens(256, 48)
    want = _hf_logits(dict(model.config.to_dict(), rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                    "rope_theta": 10000.0}), model, x)
    for name, add in [("typed", lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                                           w.add_rope_scaling_factor(4.0))),
                      ("untyped", lambda w: w.add_rope_scaling_factor(4.0))]:
        path = _rewrite(plain, tmp_path / f"{name}.gguf", add=add)
        got = load_model(path)
        assert np.abs(got.forward(x) - want).max() <= 1e-5 * np.abs(want).max(), name
    again = write_gguf(tmp_path / "again.gguf", got.config, dict(got.named_params), "f32")
    assert gguf_config(again)["rope_scaling"] == gguf_config(path)["rope_scaling"]
    assert not any(t.name == "rope_freqs.weight" for t in gguf.GGUFReader(str(again)).tensors)
    none = _rewrite(plain, tmp_path / "none.gguf", add=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.NONE),
                                                                  w.add_rope_scaling_factor(4.0)))
    assert "rope_scaling" not in gguf_config(none)


def test_rope_scaling_we_cannot_represent_is_refused(tmp_path):
    from cke_dist.formats.gguf import gguf_config
    model = Model.from_config(LlamaConfig.from_dict(ROPE_SMALL), seed=1, init_std=0.2)
    plain = write_gguf(tmp_path / "plain.gguf", model.config, dict(model.named_params), "f32")
    yarn = _rewrite(plain, tmp_path / "yarn.gguf", add=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
                                                                  w.add_rope_scaling_factor(4.0)))
    with pytest.raises(GGUFError, match="rope.scaling.type = 'yarn' .*not supported"):
        gguf_config(yarn)
    odd = np.linspace(1, 3, 8).astype(np.float32)[::-1].copy()      # larger divisors at high frequency
    bad = _rewrite(plain, tmp_path / "odd.gguf", add=lambda w: w.add_tensor("rope_freqs.weight", odd))
    with pytest.raises(GGUFError, match="not Llama 3 scaling"):
        gguf_config(bad)
    short = _rewrite(plain, tmp_path / "short.gguf", add=lambda w: w.add_tensor("rope_freqs.weight", odd[:3]))
    with pytest.raises(GGUFError, match="rope_freqs.weight has 3 values; head_dim 16 needs 8"):
        gguf_config(short)
    scaled = LlamaConfig.from_dict(dict(ROPE_SMALL, model_type="qwen2", attention_bias=True, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)))
    with pytest.raises(ValueError, match="llama architecture only"):
        write_gguf(tmp_path / "q.gguf", scaled, dict(Model.from_config(scaled, seed=0).named_params), "f32")


def test_llama_cpp_runs_our_rope_scaled_export(tmp_path):
    """Where llama-cpp-python is installed: llama.cpp applies our rope_freqs.weight (and linear
    scaling) as we do (float32 KV cache, so only the arithmetic's rounding is left)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from cke_dist.formats.tokenizer import ByteTokenizer
    ids = tokens(256, 40)[0].tolist()
    for i, rope in enumerate([dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=16),
                              dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=2.0,
                                   original_max_position_embeddings=1)]):       # linear
        cfg = LlamaConfig.from_dict(dict(ROPE_SMALL, rope_scaling={"rope_type": "llama3", **rope}))
        model = Model.from_config(cfg, seed=2, init_std=0.2)
        path = write_gguf(tmp_path / f"m{i}.gguf", cfg, dict(model.named_params), "f32", ByteTokenizer())
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, logits_all=True, type_k=0, type_v=0)
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
        ours = load_model(path).forward(np.array([ids]))[0]
        assert np.abs(theirs - ours).max() < 1e-4 * np.abs(ours).max(), rope
