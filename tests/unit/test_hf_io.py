"""Hugging Face directory I/O against real `transformers` files (tiny random LlamaForCausalLM)."""
import inspect
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cke_dist.formats.hf import HFFormatError, read_hf_dir, read_safetensors, write_hf_dir  # noqa: E402


def _tiny_hf_model(tie=False, dtype=None):
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    return m.to(dtype) if dtype is not None else m


def _save_pretrained(model, path, **kw):
    # transformers 5 always writes safetensors and dropped the flag; 4.x needs it.
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kw["safe_serialization"] = True
    model.save_pretrained(path, **kw)


def _state(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("sharded", [False, True])
def test_reads_save_pretrained_as_is(tmp_path, sharded):
    m = _tiny_hf_model()
    _save_pretrained(m, tmp_path, **({"max_shard_size": "10KB"} if sharded else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    config, tensors = read_hf_dir(tmp_path)
    assert config["hidden_size"] == 16 and config["num_key_value_heads"] == 1
    want = _state(m)
    assert set(tensors) == set(want)
    for name, arr in tensors.items():
        assert arr.dtype == np.float32 and arr.flags.c_contiguous
        np.testing.assert_array_equal(arr, want[name], err_msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_files_widen_to_float32(tmp_path, dtype):
    m = _tiny_hf_model(dtype=getattr(torch, dtype))
    _save_pretrained(m, tmp_path)
    _, tensors = read_hf_dir(tmp_path)
    for name, t in m.state_dict().items():
        assert tensors[name].dtype == np.float32
        # widening is exact: the float32 values equal the half values
        np.testing.assert_array_equal(tensors[name], t.float().numpy(), err_msg=name)


@pytest.mark.parametrize("max_shard_bytes", [None, 8000])
def test_ours_loads_in_transformers(tmp_path, max_shard_bytes):
    m = _tiny_hf_model()
    config = m.config.to_dict()
    tensors = _state(m)
    # perturb so the check cannot pass by transformers' own seeded init
    tensors = {k: v + np.float32(0.01) * np.arange(v.size, dtype=np.float32).reshape(v.shape) / v.size
               for k, v in tensors.items()}
    write_hf_dir(tmp_path, config, tensors, max_shard_bytes=max_shard_bytes)
    if max_shard_bytes:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (tmp_path / "model.safetensors").exists()
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    got = _state(loaded)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)
    # and back through our reader
    _, again = read_hf_dir(tmp_path)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(again[name], arr, err_msg=name)


def test_rewrite_single_after_sharded_drops_old_shards(tmp_path):
    tensors = {"a": np.ones((100, 10), np.float32), "b": np.zeros((100, 10), np.float32)}
    write_hf_dir(tmp_path, {"x": 1}, tensors, max_shard_bytes=4000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    write_hf_dir(tmp_path, {"x": 1}, {"a": 2 * tensors["a"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _, got = read_hf_dir(tmp_path)
    assert list(got) == ["a"] and got["a"][0, 0] == 2.0


# ---- bad input: each error names the file


def _write_small(path, **kw):
    write_hf_dir(path, {"hidden_size": 4}, {"w": np.arange(40, dtype=np.float32).reshape(4, 10)}, **kw)


def test_missing_dir_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_hf_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HFFormatError, match="config.json"):
        read_hf_dir(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 12, -1])
def test_truncated_safetensors(tmp_path, keep):
    _write_small(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[:-7])
    with pytest.raises(HFFormatError, match=r"model\.safetensors.*truncated"):
        read_hf_dir(tmp_path)


def test_corrupted_header(tmp_path):
    _write_small(tmp_path)
    f = tmp_path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[9] = 0xFF  # inside the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(HFFormatError, match=r"model\.safetensors"):
        read_safetensors(f)


def test_bad_index(tmp_path):
    tensors = {"a": np.ones((100, 10), np.float32), "b": np.zeros((100, 10), np.float32)}
    write_hf_dir(tmp_path, {}, tensors, max_shard_bytes=4000)
    index_path = tmp_path / "model.safetensors.index.json"
    good = json.loads(index_path.read_text())

    index_path.write_text("{")
    with pytest.raises(HFFormatError, match="index.json"):
        read_hf_dir(tmp_path)

    index_path.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(HFFormatError, match="weight_map"):
        read_hf_dir(tmp_path)

    bad = dict(good, weight_map=dict(good["weight_map"], a="model-00009-of-00009.safetensors"))
    index_path.write_text(json.dumps(bad))
    with pytest.raises(FileNotFoundError, match="model-00009-of-00009"):
        read_hf_dir(tmp_path)

    bad = dict(good, weight_map=dict(good["weight_map"], c=good["weight_map"]["a"]))
    index_path.write_text(json.dumps(bad))
    with pytest.raises(HFFormatError, match="'c'"):
        read_hf_dir(tmp_path)

    bad = dict(good, weight_map=dict(good["weight_map"], a="../elsewhere.safetensors"))
    index_path.write_text(json.dumps(bad))
    with pytest.raises(HFFormatError, match="not a file name"):
        read_hf_dir(tmp_path)


def test_quantized_directory_is_refused_with_the_way_to_use_it(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "quantization_config": {"quant_method": "cke_q8_0"}}')
    with pytest.raises(HFFormatError, match="cke_q8_0.*cke-dist generate"):
        read_hf_dir(tmp_path)
