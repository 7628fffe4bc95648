"""Q4_0 / Q4_1: quantization bit-equal to llama.cpp's reference (gguf's port), products against a
numpy reference of the same math, and a 4-bit model's text close to float32's."""
import numpy as np
import pytest
from cke_kernels.q4 import dequantize_q4, q4_gather_rows, q4_matmul, quantize_q4

KINDS = ["q4_0", "q4_1"]


def weight(n=96, k=256, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_quantization_is_llama_cpps_bit_for_bit(kind):
    gguf = pytest.importorskip("gguf")
    w = weight()
    packed, d, m = quantize_q4(w, kind)
    t = gguf.GGMLQuantizationType.Q4_0 if kind == "q4_0" else gguf.GGMLQuantizationType.Q4_1
    raw = gguf.quants.quantize(w, t).reshape(w.shape[0], -1, 18 if kind == "q4_0" else 20)
    np.testing.assert_array_equal(d, raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if m is not None:
        np.testing.assert_array_equal(m, raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    np.testing.assert_array_equal(packed, raw[..., -16:].reshape(w.shape[0], -1))
    np.testing.assert_array_equal(dequantize_q4(packed, d, m), gguf.quants.dequantize(raw.reshape(w.shape[0], -1), t))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 3, 8, 20, 30])
def test_products_match_the_numpy_reference(kind, rows):
    from cke_kernels.q8_0 import quantize_rows
    w = weight(seed=1)
    packed, d, m = quantize_q4(w, kind)
    x = np.random.default_rng(2).standard_normal((rows, w.shape[1])).astype(np.float32)
    got = q4_matmul(packed, d, m, x, np.empty((rows, w.shape[0]), np.float32))
    wd = dequantize_q4(packed, d, m)
    from cke_kernels.q8_0 import MATVEC_MAX_ROWS
    if rows > MATVEC_MAX_ROWS:       # prefill: float activations through BLAS
        np.testing.assert_allclose(got, x @ wd.T, rtol=1e-4, atol=1e-4)
        return
    xq, xd = np.empty(x.shape, np.int8), np.empty((rows, w.shape[1] // 32), np.float32)
    quantize_rows(x, xq, xd)           # decode: x as Q8_0 blocks, exactly what the kernel multiplies
    ref = xq.reshape(rows, -1, 32).astype(np.float64) * xd[..., None]
    np.testing.assert_allclose(got, ref.reshape(rows, -1) @ wd.T.astype(np.float64), rtol=2e-5, atol=2e-4)
    # and the activation rounding keeps it near the float product
    assert np.abs(got - x @ wd.T).max() < 0.02 * np.abs(x @ wd.T).max()


@pytest.mark.parametrize("kind", KINDS)
def test_gather_rows_is_the_dequantized_row(kind):
    packed, d, m = quantize_q4(weight(seed=3), kind)
    ids = np.array([5, 0, 95, 5])
    got = q4_gather_rows(packed, d, m, ids, np.empty((4, 256), np.float32))
    np.testing.assert_array_equal(got, dequantize_q4(packed, d, m)[ids])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q4(np.zeros((4, 30), np.float32), "q4_0")
    packed, d, m = quantize_q4(weight(), "q4_0")
    with pytest.raises(ValueError, match="do not fit"):
        q4_matmul(packed, d, m, np.zeros((1, 128), np.float32), np.empty((1, 96), np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_a_4bit_directory_generates_what_the_in_memory_model_does(tmp_path, kind):
    """cke-dist quantize --format q4_x: the directory holds the packed blocks, loads back to the same
    model (in memory 5 bits a weight for Q4_0, 6 for Q4_1: float32 block scales), and stays close
    to float32."""
    from cke_dist.cli import main as cli_main
    from cke_dist.model import LlamaConfig, Model
    from cke_dist.model.load import load_inference_model
    from cke_dist.serving.generate import generate

    cfg = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    Model.from_config(LlamaConfig.from_dict(cfg), seed=0, init_std=0.05).save(tmp_path / "f32")
    assert cli_main(["quantize", "--model", str(tmp_path / "f32"), "--out", str(tmp_path / kind),
                     "--format", kind]) == 0
    f32 = load_inference_model(tmp_path / "f32")
    q = load_inference_model(tmp_path / kind)
    assert q.quantize == kind
    assert q.weight_bytes_per_token() < (0.16 if kind == "q4_0" else 0.19) * f32.weight_bytes_per_token()
    same = f32.to_quantized(kind)
    prompt = list(range(5, 17))
    assert generate(q, prompt, 10, temperature=0) == generate(same, prompt, 10, temperature=0)
    a = q.prefill(q.new_cache(1, 16), 0, prompt, all_logits=True)
    b = f32.prefill(f32.new_cache(1, 16), 0, prompt, all_logits=True)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.94, cos      # random Gaussian weights: 4 bits lose more than on a real model (SmolLM2: 0.998)
