"""Tensor-parallel decode on the ranks mpiexec gives (driven at 2 by tests/integration/test_generate.py):
the same InferenceModel on head/column shards equals one process.

Run by hand: mpiexec -n 2 python -m pytest --with-mpi -q tests/ranks/decode_tp_mpi.py
"""
import numpy as np
import pytest
from tiny import VOCAB

from cke_dist.model.inference import InferenceModel
from cke_dist.serving.generate import generate


def prompt(n=11, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def _tp_shards(model, rank, size):
    """This rank's shards of a one-process Model's tensors, cut as the layout cuts them."""
    from cke_dist.model import param_specs
    return {s.name: np.ascontiguousarray(s.take(model.named_params[s.name]))
            for s in param_specs(model.config, size, rank)}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("model_type, bias, heads", [("llama", False, (4, 2)), ("qwen2", True, (4, 2)),
                                                     ("llama", True, (4, 2)), ("llama", False, (12, 3))])
def test_sharded_decode_matches_single(model_type, bias, heads):
    """Head-sharded layers, vocab-parallel embedding and LM head; (12, 3) cuts a GQA group in two."""
    from cke_dist.comm import init
    from cke_dist.model import LlamaConfig, Model
    world = init(transport="tcp")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16 * heads[0], intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads[0], num_key_value_heads=heads[1], max_position_embeddings=64,
                      tie_word_embeddings=model_type == "llama", model_type=model_type, attention_bias=bias)
    model = Model.from_config(cfg, seed=0, init_std=0.2)                   # the same on every rank
    for name, p in model.named_params.items():
        if name.endswith("bias"):
            p[...] = np.random.default_rng(1).standard_normal(p.shape) * 0.5
    full = InferenceModel.from_model(model)
    tp = InferenceModel(cfg, _tp_shards(model, world.rank, world.size), tp_group=world)
    assert tp.heads.n_q == heads[0] // world.size
    ids = prompt(9)
    cf, ct = full.new_cache(1, 16), tp.new_cache(1, 16)
    a, b = [full.prefill(cf, 0, ids)], [tp.prefill(ct, 0, ids)]
    for t in prompt(5, seed=3):
        a.append(full.decode(cf, [0], [t])[0])
        b.append(tp.decode(ct, [0], [t])[0])
    np.testing.assert_allclose(np.stack(b), np.stack(a), rtol=1e-5, atol=1e-5 * np.abs(a).max())
    assert generate(tp, ids, 12, temperature=0) == generate(full, ids, 12, temperature=0)


@pytest.mark.mpi(min_size=2)
def test_q8_0_directory_loads_its_shards(tmp_path):
    """A Q8_0 directory loaded with a tp group: each rank keeps its slices (it used to keep whole
    tensors, so o/down outputs were summed tp times over). Equals one-process Q8_0."""
    from cke_dist.comm import init
    from cke_dist.model import LlamaConfig, Model
    from cke_dist.model.load import load_inference_model, save_quantized
    world = init(transport="tcp")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Model.from_config(cfg, seed=0, init_std=0.2)
    save_quantized(InferenceModel.from_model(model, quantize="q8_0"), tmp_path / "q8")   # each rank its own copy
    one, tp = load_inference_model(tmp_path / "q8"), load_inference_model(tmp_path / "q8", tp_group=world)
    assert tp.quantize == "q8_0" and tp.layers[0]["down"].in_features == 128 // world.size
    ids = prompt(9)
    a, b = one.prefill(one.new_cache(1, 16), 0, ids), tp.prefill(tp.new_cache(1, 16), 0, ids)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert generate(tp, ids, 12, temperature=0) == generate(one, ids, 12, temperature=0)
