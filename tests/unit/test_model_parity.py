"""The model against the PyTorch reference (tests/helpers/reference.py) and against transformers'
LlamaForCausalLM / Qwen2ForCausalLM with the same weights: logits, loss, every named
gradient, parameters after 10 SGD and 10 AdamW steps, and checkpoints both ways."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import reference as R
import torch

from mpirun import PROGRAMS, run_program
from tiny import PARITY_CONFIGS, batch, make_model

from cke_kernels import THREAD_VARS, TRAINING_POOL_ENV
from cke_dist.model import LlamaConfig, Model, load_model
from cke_dist.train.optim import SGD, AdamW

RTOL, ATOL = 1e-4, 1e-5

def assert_close(ours, ref, what, rtol=RTOL, atol=ATOL):
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("kind", list(PARITY_CONFIGS))
def test_logits_loss_grads_match_reference(kind):
    model = make_model(kind)
    cfg = model.config
    x, y = batch(cfg)
    p = R.torch_params(model)
    logits = R.forward(p, cfg, x)
    loss = R.loss_fn(logits, y)
    loss.backward()
    assert_close(model.forward(x), logits, "logits")
    model.zero_grad()
    ours = model.forward_backward(x, y)
    assert ours == pytest.approx(loss.item(), rel=1e-6)
    assert model.loss(x, y) == pytest.approx(loss.item(), rel=1e-6)
    assert set(model.named_grads) == set(p)
    for name, g in model.named_grads.items():
        assert_close(g, p[name].grad, name)


@pytest.mark.parametrize("kind", list(PARITY_CONFIGS))
def test_matches_transformers(kind):
    model = make_model(kind)
    cfg = model.config
    x, y = batch(cfg, seed=1)
    hf = R.hf_model(cfg, model.named_params)
    out = hf(torch.from_numpy(x), labels=None)
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), torch.from_numpy(y).reshape(-1))
    loss.backward()
    assert_close(model.forward(x), out.logits, "logits vs transformers")
    model.zero_grad()
    assert model.forward_backward(x, y) == pytest.approx(loss.item(), rel=1e-6)
    hf_grads = dict(hf.named_parameters())
    for name, g in model.named_grads.items():
        assert_close(g, hf_grads[name].grad, f"grad {name} vs transformers")


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied-bias"])
def test_params_after_10_steps(kind, opt_name):
    model = make_model(kind)
    cfg = model.config
    p = R.torch_params(model)
    if opt_name == "sgd":
        ours = SGD(model, lr=0.05, momentum=0.9, weight_decay=0.01)
        ref = torch.optim.SGD(list(p.values()), lr=0.05, momentum=0.9, weight_decay=0.01)
    else:
        # eps 1e-5, not 1e-8: Adam's step is lr * g / (|g| + eps), so for a gradient element of ~1e-6
        # (seen here) the float32 noise of both implementations (~1e-8 absolute) becomes ~1% of a step;
        # with eps 1e-5 that noise is bounded by lr * 1e-8 / eps per step. The update rule itself is
        # checked with eps 1e-8 on identical gradients in tests/unit/test_kernels.py::test_adamw.
        ours = AdamW(model, lr=2e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
        ref = torch.optim.AdamW(list(p.values()), lr=2e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    for step in range(10):
        x, y = batch(cfg, seed=10 + step)
        ref.zero_grad()
        R.loss_fn(R.forward(p, cfg, x), y).backward()
        ref.step()
        model.zero_grad()
        model.forward_backward(x, y)
        ours.step()
    for name, v in model.named_params.items():
        assert_close(v, p[name], f"{name} after 10 {opt_name} steps", rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kind", list(PARITY_CONFIGS))
def test_grad_accumulation_and_scale(kind):
    model = make_model(kind)
    x, y = batch(model.config, B=4)
    model.zero_grad()
    full = model.forward_backward(x, y)
    g_full = model.grads.copy()
    model.zero_grad()
    # two halves with their own means: 0.5 * (mean_a + mean_b) equals the full mean here because
    # both halves hold the same number of valid targets (one ignored target each)
    la = model.forward_backward(x[:2], y[:2], grad_scale=0.5)
    model.forward(x[:1, :5])  # an evaluation of another shape in between changes nothing
    lb = model.forward_backward(x[2:], y[2:], grad_scale=0.5)
    assert 0.5 * (la + lb) == pytest.approx(full, rel=1e-6)
    np.testing.assert_allclose(model.grads, g_full, rtol=1e-4, atol=1e-6)
    # grads add on top of what is there (no zero_grad in between)
    model.forward_backward(x, y)
    np.testing.assert_allclose(model.grads, 2 * g_full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied-bias"])
def test_on_grad_ready_covers_buffer_once_back_to_front(kind):
    model = make_model(kind)
    x, y = batch(model.config)
    seen = []
    model.zero_grad()
    model.forward_backward(x, y)  # grads from a first micro-batch, so the second call accumulates
    model.forward_backward(x, y, on_grad_ready=lambda a, b: seen.append((a, b, model.grads[a:b].copy())))
    spans = sorted((a, b) for a, b, _ in seen)
    assert spans[0][0] == 0 and spans[-1][1] == model.num_params
    assert all(s[1] == t[0] for s, t in zip(spans, spans[1:])), "ranges must tile the buffer exactly"
    starts = [a for a, _, _ in seen]
    assert starts == sorted(starts, reverse=True), "last layer first"
    assert len(seen) == model.config.num_hidden_layers + 2
    for a, b, snap in seen:  # a range reported ready never changes afterwards
        np.testing.assert_array_equal(snap, model.grads[a:b])


def test_flat_buffer_layout():
    model = make_model("qwen2")
    names = list(model.param_offsets)
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    assert names[-2] == "model.norm.weight"
    layer_idx = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    assert layer_idx == sorted(layer_idx)
    for name, (a, b) in model.param_offsets.items():
        v, g = model.named_params[name], model.named_grads[name]
        assert np.shares_memory(v, model.params[a:b]) and np.shares_memory(g, model.grads[a:b])
    assert sum(b - a for a, b in model.param_offsets.values()) == model.params.size == model.grads.size


def test_seed_is_deterministic():
    cfg = make_model("llama-gqa").config
    a, b, c = (Model.from_config(cfg, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)


@pytest.mark.parametrize("kind", list(PARITY_CONFIGS))
def test_checkpoint_round_trip_with_transformers(kind, tmp_path):
    model = make_model(kind)
    cfg = model.config
    x, _ = batch(cfg)
    want = model.forward(x)
    # ours -> transformers
    model.save(tmp_path / "ours")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        assert_close(hf(torch.from_numpy(x)).logits, want, "transformers loading our checkpoint")
    # transformers -> ours, single file and sharded with an index
    hf.save_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="20KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    for d in ("hf", "hf_sharded"):
        back = load_model(tmp_path / d)
        assert back.config.tie_word_embeddings == cfg.tie_word_embeddings
        assert_close(back.forward(x), want, f"load_model of transformers' {d}", rtol=0, atol=0)


def test_load_rejects_mismatched_checkpoint(tmp_path):
    model = make_model("llama-gqa")
    model.save(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["intermediate_size"] = 44
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight has shape .* expects"):
        load_model(tmp_path)
    conf["intermediate_size"] = 40
    conf["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="missing tensor.*model.layers.2"):
        load_model(tmp_path)


@pytest.mark.parametrize("change,key", [
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(model_type="gpt2"), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_bad_config_names_the_key(change, key):
    d = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4)
    d.update(change)
    with pytest.raises(ValueError, match=key):
        LlamaConfig.from_dict(d)
    d = dict(vocab_size=61, hidden_size=32)
    with pytest.raises(ValueError, match="intermediate_size"):
        LlamaConfig.from_dict(d)


def test_config_round_trips_through_transformers():
    from transformers import AutoConfig
    cfg = make_model("llama-tied-bias").config
    hf = AutoConfig.for_model(**cfg.to_dict())
    back = LlamaConfig.from_dict(hf.to_dict())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                "attention_bias", "model_type"):
        assert getattr(back, key) == getattr(cfg, key), key


LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # with head_dim 8 and theta 1000 the wavelengths (6.3, 35, 199, 1117) fall in all three
               # regions of Llama 3 scaling: kept (< 16), blended (16..64) and divided by factor (> 64)
               "original_max_position_embeddings": 64}


def test_llama3_rope_scaling_matches_transformers():
    """Llama 3.x checkpoints (rope_type "llama3") load and compute as in transformers."""
    cfg = LlamaConfig.from_dict(dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, rope_theta=1000.0,
                                     rms_norm_eps=1e-5, rope_scaling={"rope_type": "llama3", **LLAMA3_ROPE}))
    assert cfg.rope_scaling == LLAMA3_ROPE
    model = Model.from_config(cfg, seed=0, init_std=0.1)
    plain = Model.from_config(cfg.replace(rope_scaling=None), seed=0, init_std=0.1)
    x, y = batch(cfg, T=40, seed=1)
    hf = R.hf_model(cfg, model.named_params)
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    out = hf(torch.from_numpy(x))
    assert_close(model.forward(x), out.logits, "logits vs transformers (llama3 rope)")
    # the scaling is really applied: without it the logits differ
    assert np.abs(plain.forward(x) - out.logits.detach().numpy()).max() > 1e-3
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), torch.from_numpy(y).reshape(-1))
    loss.backward()
    model.zero_grad()
    assert model.forward_backward(x, y) == pytest.approx(loss.item(), rel=1e-6)
    hf_grads = dict(hf.named_parameters())
    for name, g in model.named_grads.items():
        assert_close(g, hf_grads[name].grad, f"grad {name} vs transformers (llama3 rope)")


def test_bad_tokens():
    model = make_model("llama-gqa")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward(np.array([[1, 61]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward_backward(np.array([[1, 2]]), np.array([[3, 99]]))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model.forward(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="targets shape"):
        model.forward_backward(np.array([[1, 2]]), np.array([[3]]))


def test_tp_group_of_size_one_is_the_plain_model():
    class One:
        size, rank = 1, 0

        def allreduce(self, buf, op="sum"):
            return buf
    model = make_model("llama-gqa")
    other = Model(model.config, tp_group=One())
    other.params[...] = model.params
    x, _ = batch(model.config)
    np.testing.assert_array_equal(other.forward(x), model.forward(x))


def test_tied_checkpoint_with_a_different_lm_head_is_rejected(tmp_path):
    from safetensors.numpy import load_file, save_file
    model = make_model("llama-tied-bias")
    model.save(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        load_model(tmp_path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # equal copy: fine
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    x, _ = batch(model.config)
    np.testing.assert_array_equal(load_model(tmp_path).forward(x), model.forward(x))


def test_bf16_transformers_checkpoint_loads_as_float32(tmp_path):
    model = make_model("qwen2")
    hf = R.hf_model(model.config, model.named_params).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    back = load_model(tmp_path / "bf16")
    for name, v in back.named_params.items():
        np.testing.assert_array_equal(v, hf.state_dict()[name].float().numpy(), err_msg=name)
    back.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "float32"


def test_two_threads_match_one(tmp_path):
    """The prange kernels with 2 numba threads (races would show) against this 1-thread process."""
    out = tmp_path / "two.npz"
    r = run_program("train_step_threads.py", 2, out, threads=2)
    assert r.returncode == 0, r.stderr
    model = make_model("llama-gqa")
    x, y = batch(model.config, B=4, T=33)
    model.zero_grad()
    loss = model.forward_backward(x, y)
    model.forward_backward(x, y, grad_scale=0.5)
    AdamW(model, lr=1e-3).step()
    two = np.load(out)
    assert float(two["loss"]) == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(two["grads"], model.grads, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(two["params"], model.params, rtol=1e-5, atol=1e-7)


def test_training_pools_whatever_the_import_order():
    """A script that started OpenBLAS before importing cke_dist trains with the CLI's pool settings:
    OpenBLAS's workers re-read their timeout at the first training batch, and libgomp (not started
    yet) gets the passive policy; the GEMM after the restart is still right. Two threads: OpenBLAS's
    workers exist."""
    env = {k: v for k, v in os.environ.items() if k not in TRAINING_POOL_ENV}
    r = subprocess.run(
        [sys.executable, str(PROGRAMS / "training_pools.py")], capture_output=True, text=True, timeout=300,
        env={**env, **{var: "2" for var in THREAD_VARS}})
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["before"] == "0 None", r.stdout
    assert lines["after"] == f"{TRAINING_POOL_ENV['OPENBLAS_THREAD_TIMEOUT']} {TRAINING_POOL_ENV['OMP_WAIT_POLICY']}"
    assert lines["gemm"].startswith("256.0 loss ")
