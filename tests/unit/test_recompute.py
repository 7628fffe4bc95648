"""Activation recomputation (train.recompute) changes memory, not results: the same gradients, bitwise,
with every layer's caches kept and with each layer's forward recomputed from its input; plain and
packed rows, LoRA adapters, a zero-bubble W pass."""
import numpy as np
import pytest
from tiny import batch, make_model

from cke_dist.model.llama import RECOMPUTE
from cke_dist.model.lora import TARGETS, LoraModel, LoraSettings


def grads_of(model, mode, x, y, positions=None, steps=2):
    model.recompute = mode
    model.zero_grad()
    losses = [model.forward_backward(x, y, positions=positions, grad_scale=0.5) for _ in range(steps)]
    return losses, model.grads.copy()


@pytest.mark.parametrize("packed", [False, True])
def test_recompute_gives_the_same_gradients(packed):
    model = make_model("llama-gqa")
    x, y = batch(model.config, B=3, T=16)
    pos = np.array([list(range(7)) + list(range(9)), list(range(16)), list(range(4)) * 4]) if packed else None
    ref_loss, ref = grads_of(model, "none", x, y, pos)
    assert np.abs(ref).max() > 0
    loss, g = grads_of(model, "full", x, y, pos)
    assert loss == ref_loss
    np.testing.assert_array_equal(g, ref)


def test_recompute_holds_fewer_caches():
    model = make_model("llama-gqa")
    L = model.config.num_hidden_layers
    sizes = {}
    for mode in RECOMPUTE:
        model.recompute = mode
        a = model.new_activations(3, 16)
        sizes[mode] = (a.lse.shape[0], a.h.shape[0], a.resid.shape[0])
    assert sizes == {"none": (L, L, L + 1), "full": (1, 1, L + 1)}
    model.recompute = "some"
    with pytest.raises(ValueError, match="recompute must be one of none, full, got 'some'"):
        model.new_activations(3, 16)


def test_recompute_with_lora_dropout():
    """The adapters' dropout masks come back the same in the recomputed forward."""
    out = {}
    for mode in RECOMPUTE:
        base = make_model("llama-gqa")
        base.freeze()
        base.recompute = mode
        lora = LoraModel(base, LoraSettings(4, 8.0, 0.1, TARGETS), seed=3)
        lora.params[:] = np.random.default_rng(1).standard_normal(lora.params.size).astype(np.float32) * 0.05
        x, y = batch(base.config, B=3, T=16)
        lora.zero_grad()
        loss = lora.forward_backward(x, y)
        out[mode] = (loss, lora.grads.copy())
    assert out["full"][0] == out["none"][0]
    np.testing.assert_array_equal(out["full"][1], out["none"][1])


def test_recompute_full_with_a_deferred_weight_pass():
    """Zero-bubble's W jobs run after the whole B pass, when later layers have reused the recomputed
    caches: they must have kept their own inputs."""
    model = make_model("llama-gqa")
    x, y = batch(model.config, B=3, T=16)
    _, ref = grads_of(model, "none", x, y, steps=1)
    model.recompute = "full"
    model.zero_grad()
    a = model.stage_forward(x, model.new_activations(3, 16))
    jobs = []
    model.backward(a, x, y, grad_scale=0.5, defer=jobs)
    for job in jobs:
        job()
    np.testing.assert_array_equal(model.grads, ref)
