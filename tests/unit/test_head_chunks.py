"""The LM head and the loss in chunks of token rows (Model._head_loss): the whole batch's logits never
live at once, and the loss and every gradient are those of one chunk, to float32 rounding (the head's
weight gradient is summed chunk by chunk); also for a frozen LoRA base and a zero-bubble W pass."""
import numpy as np
import pytest
from tiny import batch, make_model

from cke_dist.model.lora import TARGETS, LoraModel, LoraSettings


def run(model, rows, x, y, defer=False):
    model.head_rows = rows
    model.zero_grad()
    if not defer:
        return model.forward_backward(x, y, grad_scale=0.5), model.grads.copy()
    a = model.stage_forward(x, model.new_activations(*x.shape))
    jobs = []
    loss = model.backward(a, x, y, grad_scale=0.5, defer=jobs)
    for job in jobs:
        job()
    return loss, model.grads.copy()


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2"])
@pytest.mark.parametrize("defer", [False, True])
def test_chunks_give_the_whole_head(name, defer):
    model = make_model(name)
    x, y = batch(model.config, B=3, T=11)          # 33 rows: chunks of 5 leave a short last one
    ref_loss, ref = run(model, None, x, y)
    assert model._acts_train.logits.shape[0] == 33
    loss, g = run(model, 5, x, y, defer)
    assert defer or model._acts_train.logits.shape[0] == 5
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    model.head_rows = 5                             # evaluation's loss, in chunks too
    assert model.loss(x, y) == pytest.approx(model.forward_backward(x, y, grad_scale=0.0), rel=1e-6)


def test_chunks_under_a_frozen_lora_base():
    out = {}
    for rows in (None, 4):
        base = make_model("llama-gqa")
        base.freeze()
        base.head_rows = rows
        lora = LoraModel(base, LoraSettings(4, 8.0, 0.0, TARGETS), seed=3)
        lora.params[:] = np.random.default_rng(1).standard_normal(lora.params.size).astype(np.float32) * 0.05
        x, y = batch(base.config, B=3, T=11)
        lora.zero_grad()
        out[rows] = (lora.forward_backward(x, y), lora.grads.copy())
    assert out[4][0] == pytest.approx(out[None][0], rel=1e-6)
    np.testing.assert_allclose(out[4][1], out[None][1], rtol=1e-5, atol=1e-7)
