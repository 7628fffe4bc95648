"""Q8_0: format round trip bound, the kernels against numpy, model logits vs float32, the quantize job."""
import numpy as np
import pytest
from cke_kernels.q8_0 import (
    MATVEC_MAX_ROWS,
    dequantize_q8_0,
    make_q8_dot,
    q8_0_gather_rows,
    q8_0_matmul,
    q8_0_matvec,
    quantize_q8_0,
    quantize_rows,
)

rng = np.random.default_rng(0)


def test_round_trip_within_half_a_step():
    w = rng.standard_normal((37, 96)).astype(np.float32) * 3
    w[0, :32] = 0.0                       # an all-zero block
    w[1, 40] = 1e4                        # an outlier: only its own block loses precision
    qs, d = quantize_q8_0(w)
    assert qs.dtype == np.int8 and d.shape == (37, 3) and np.abs(qs).max() <= 127
    assert np.array_equal(d.astype(np.float16).astype(np.float32), d)   # scales are float16 values
    err = np.abs(dequantize_q8_0(qs, d) - w).reshape(37, 3, 32)
    assert np.all(err <= d[:, :, None] / 2 * (1 + 1e-6))
    assert np.all(err[0, 0] == 0)
    # the largest magnitude of a block is hit within the float16 rounding of its scale
    amax = np.abs(w).reshape(37, 3, 32).max(axis=2)
    np.testing.assert_allclose(np.abs(qs).reshape(37, 3, 32).max(axis=2) * d, amax, rtol=2e-3)
    assert np.abs(dequantize_q8_0(qs, d)[1, 64:] - w[1, 64:]).max() < 0.05   # neighbours of the outlier
    # relative error of a Gaussian weight: ~ 1/(127 * 2 * sqrt(3)) * max/std
    g = rng.standard_normal((64, 256)).astype(np.float32)
    rel = np.linalg.norm(dequantize_q8_0(*quantize_q8_0(g)) - g) / np.linalg.norm(g)
    assert rel < 0.01


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(np.zeros((4, 40), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        qs, d = quantize_q8_0(np.zeros((4, 64), np.float32))
        q8_0_matvec(qs, d, np.zeros((1, 32), np.float32), np.zeros((1, 4), np.float32))


def quantized_activations(x):
    xq = np.empty(x.shape, np.int8)
    xd = np.empty((x.shape[0], x.shape[1] // 32), np.float32)
    quantize_rows(x, xq, xd)
    return xq, xd


def exact_q8_q8(qs, d, xq, xd):
    """What the decode GEMV computes, in float64: per block an exact integer dot times both scales."""
    n, k = qs.shape
    dots = (qs.astype(np.int64).reshape(n, 1, k // 32, 32) * xq.reshape(1, -1, k // 32, 32)).sum(-1)
    return (dots * d[:, None, :].astype(np.float64) * xd[None].astype(np.float64)).sum(-1).T


def test_activation_quantization_within_half_a_step():
    x = rng.standard_normal((3, 96)).astype(np.float32)
    x[1, :32] = 0.0
    x[2, 64] = 1e5
    xq, xd = quantized_activations(x)
    err = np.abs(xq.astype(np.float32).reshape(3, 3, 32) * xd[:, :, None] - x.reshape(3, 3, 32))
    assert np.all(err <= xd[:, :, None] / 2 * (1 + 1e-6))
    assert np.abs(xq).max() <= 127 and np.all(xq[1, :32] == 0) and xd[1, 0] == 0


@pytest.mark.parametrize("m", [1, 3, 8, 20])
def test_products_match_numpy_on_dequantized(m):
    w = rng.standard_normal((300, 160)).astype(np.float32)      # 300 rows: a remainder after 8-row tasks
    qs, d = quantize_q8_0(w)
    x = rng.standard_normal((m, 160)).astype(np.float32)
    out = np.empty((m, 300), np.float32)
    got = q8_0_matmul(qs, d, x, out)
    wd = dequantize_q8_0(qs, d).astype(np.float64)
    ref = x.astype(np.float64) @ wd.T
    if m > MATVEC_MAX_ROWS:                    # prefill: float activations, BLAS
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    else:                                      # decode: the activations are quantized to Q8_0 first
        xq, xd = quantized_activations(x)
        np.testing.assert_allclose(got, exact_q8_q8(qs, d, xq, xd), rtol=1e-5, atol=1e-5)
        # ... which moves each product by at most sum over blocks of |w| * (half an activation step)
        bound = (np.abs(wd).reshape(1, 300, 5, 32).sum(-1) * xd[:, None, :] / 2).sum(-1)
        assert np.all(np.abs(got - ref) <= bound * 1.001 + 1e-5)
        assert np.all(q8_0_matvec(qs, d, x, np.empty_like(out)) == got)
    ids = np.array([5, 0, 299], np.int64)
    rows = q8_0_gather_rows(qs, d, ids, np.empty((3, 160), np.float32))
    np.testing.assert_array_equal(rows, dequantize_q8_0(qs, d)[ids])


def test_every_integer_dot_codegen_is_exact_and_identical():
    """Each instruction-set variant of the block dot (the host's kernel uses one; the others are
    compiled here where the CPU has them) against the exact integer reference, odd block counts
    included, and bit-identical to the plain-IR variant that sums its lanes the same way."""
    from cke_kernels.q8_0 import GROUPING
    from llvmlite import binding as llvm
    from numba import njit
    feats = llvm.get_host_cpu_features()
    variants = ["generic", "generic4"] + [s for s in ("avx2", "avx512bw") if feats.get(s)]
    if feats.get("avx512vnni") and feats.get("avx512vl"):
        variants.append("vnni")
    print("integer dot variants compiled on this CPU:", variants)
    for nb in (1, 2, 5):
        qs = rng.integers(-127, 128, (4, 32 * nb)).astype(np.int8)
        qs[0, :32] = -127                                  # extreme products: 4 x 127^2 per int32 lane
        d = rng.random((4, nb)).astype(np.float32)
        xq = rng.integers(-127, 128, (1, 32 * nb)).astype(np.int8)
        xq[0, :32] = -127
        xd = rng.random((1, nb)).astype(np.float32)
        got = {}
        for simd in variants:
            dot1, dot3 = make_q8_dot(simd, 1), make_q8_dot(simd, 3)

            @njit
            def rows4(qs, d, xq, xd, nb):
                a = dot3(qs, 0, d, 0, xq, 0, xd, 0, nb)
                return np.array([a[0], a[1], a[2], dot1(qs, 3 * nb * 32, d, 3 * nb, xq, 0, xd, 0, nb)[0]])

            got[simd] = rows4(qs, d, xq, xd, nb)
            # float32 scaling and summing of the exact block dots: error relative to the sum of |terms|
            scale = exact_q8_q8(np.abs(qs.astype(np.int16)), d, np.abs(xq.astype(np.int16)), xd)[0]
            assert np.all(np.abs(got[simd] - exact_q8_q8(qs, d, xq, xd)[0]) <= 1e-6 * scale), simd
            same = "generic" if GROUPING[simd] == "pairs" else "generic4"
            np.testing.assert_array_equal(got[simd], got[same], err_msg=simd)


def test_matvec_inf_nan_propagate_and_layout_is_checked():
    qs, d = quantize_q8_0(rng.standard_normal((16, 64)).astype(np.float32))
    x = rng.standard_normal((2, 64)).astype(np.float32)
    x[0, 3], x[1, 40] = np.nan, np.inf
    out = q8_0_matvec(qs, d, x, np.empty((2, 16), np.float32))
    assert np.all(np.isnan(out))
    with pytest.raises(ValueError, match="x must be C-contiguous float32"):
        q8_0_matvec(qs, d, np.zeros((1, 128), np.float32)[:, ::2], np.empty((1, 16), np.float32))
    with pytest.raises(ValueError, match="weight must be C-contiguous int8"):
        q8_0_matvec(qs.astype(np.int16), d, x, np.empty((2, 16), np.float32))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request, tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny import make_hf_checkpoint

    from cke_dist.model.load import load_inference_model
    d = tmp_path_factory.mktemp(request.param)
    # wider than the parity models: Q8_0 error averages out over more terms, as in real models
    make_hf_checkpoint(d, request.param, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                       num_key_value_heads=2, initializer_range=0.05)
    f32 = load_inference_model(d)
    return d, f32, f32.to_quantized("q8_0")


def test_q8_0_logits_close_to_float32(models):
    from cke_dist.serving.generate import generate
    _, f32, q8 = models
    ids = np.random.default_rng(3).integers(0, 300, 8).tolist()
    seq = ids + generate(f32, ids, 56, temperature=0)        # the float32 model's own greedy text
    lf = f32.prefill(f32.new_cache(1, 64), 0, seq, all_logits=True)
    # prefill (64 rows: float activations, BLAS) and decode (a step at a time: Q8_0 activations,
    # the integer GEMV) along the same text, both against float32
    lq = q8.prefill(q8.new_cache(1, 64), 0, seq, all_logits=True)
    cache = q8.new_cache(1, 64)
    steps = [q8.prefill(cache, 0, seq[:8], all_logits=True)]
    steps += [q8.decode(cache, [0], [t]) for t in seq[8:]]
    ld = np.concatenate(steps)
    for name, lx in (("prefill", lq), ("decode", ld)):
        cos = (lf * lx).sum(1) / np.linalg.norm(lf, axis=1) / np.linalg.norm(lx, axis=1)
        agree = np.mean(lf.argmax(1) == lx.argmax(1))
        print(f"Q8_0 {name} vs float32: min cosine {cos.min():.6f}, greedy top-1 agreement {agree:.3f} "
              f"over {len(seq)} steps")
        assert cos.min() > 0.999, name
        assert agree >= 0.9, name
    assert q8.weight_bytes_per_token() < 0.3 * f32.weight_bytes_per_token()


def test_quantize_job_writes_a_dir_that_generates_the_same(models, tmp_path, capsys):
    from cke_dist.cli import main as cli_main
    from cke_dist.model.load import load_inference_model
    from cke_dist.serving.generate import generate
    d, _, q8 = models
    (d / "cke_tokenizer.json").write_text('{"type": "bytes"}')
    out = tmp_path / "q8"
    assert cli_main(["quantize", "--model", str(d), "--out", str(out)]) == 0
    assert (out / "cke_tokenizer.json").is_file()
    assert (out / "model.safetensors").stat().st_size < 0.35 * (d / "model.safetensors").stat().st_size
    loaded = load_inference_model(out)
    assert loaded.quantize == "q8_0"
    ids = [1, 2, 3, 4, 5]
    a = loaded.prefill(loaded.new_cache(1, 5), 0, ids, all_logits=True)
    b = q8.prefill(q8.new_cache(1, 5), 0, ids, all_logits=True)
    np.testing.assert_array_equal(a, b)
    assert generate(loaded, ids, 10, temperature=0) == generate(q8, ids, 10, temperature=0)
    # the generate job gives the same text from the Q8_0 dir and from load-time quantization
    texts = []
    for model_dir, extra in ((out, []), (d, ["--quantize", "q8_0"])):
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert cli_main(["generate", "--model", str(model_dir), "--prompt", "hi", "--temperature", "0",
                             "--max-new-tokens", "12"] + extra) == 0
        texts.append(buf.getvalue())
    assert texts[0] == texts[1] and texts[0].startswith("hi") and len(texts[0]) > 3
    capsys.readouterr()
    assert cli_main(["quantize", "--model", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "cke-dist quantize: error: " in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_q8_0_dir_with_bad_tensor_is_named(models, tmp_path):
    from safetensors.numpy import load_file, save_file

    from cke_dist.model.load import load_inference_model, save_quantized
    _, _, q8 = models
    save_quantized(q8, tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    t[name + "_scale"] = t[name + "_scale"][:, :-1]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=name):
        load_inference_model(tmp_path)
    t[name] = t[name].astype(np.float32)
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{name} should be Q8_0"):
        load_inference_model(tmp_path)
