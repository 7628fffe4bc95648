"""cke_dist.train.optim against torch.optim on a real model's flat buffers; state round trips; clipping."""
import numpy as np
import pytest
import torch

from cke_dist.model import LlamaConfig, Model
from cke_dist.parallel.step import clip_grad_norm, grad_norm
from cke_dist.train.optim import SGD, AdamW

CFG = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)


def model_with_grads(seed=0):
    m = Model.from_config(CFG, seed=seed)
    m.grads[...] = np.random.default_rng(seed).standard_normal(m.grads.size).astype(np.float32)
    return m


def torch_twin(model, opt_cls, **kw):
    p = torch.tensor(model.params.copy(), requires_grad=True)
    return p, opt_cls([p], **kw)


@pytest.mark.parametrize("make_ours,make_ref", [
    (lambda m: AdamW(m, lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05),
     lambda p: torch.optim.AdamW([p], lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05)),
    (lambda m: SGD(m, lr=0.1, momentum=0.9, weight_decay=0.01),
     lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)),
    (lambda m: SGD(m, lr=0.1),
     lambda p: torch.optim.SGD([p], lr=0.1)),
], ids=["adamw", "sgd-momentum", "sgd-plain"])
def test_matches_torch_with_lr_override(make_ours, make_ref):
    m = model_with_grads()
    p = torch.tensor(m.params.copy(), requires_grad=True)
    ours, ref = make_ours(m), make_ref(p)
    r = np.random.default_rng(5)
    for lr in [None, 0.05, None, 0.001, None]:
        g = r.standard_normal(m.grads.size).astype(np.float32)
        m.grads[...] = g
        p.grad = torch.from_numpy(g.copy())
        if lr is not None:
            ref.param_groups[0]["lr"] = lr
        ours.step(lr=lr)
        ref.step()
        ref.param_groups[0]["lr"] = ours.lr
    np.testing.assert_allclose(m.params, p.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda m: AdamW(m, lr=1e-2, weight_decay=0.1),
                                  lambda m: SGD(m, lr=0.1, momentum=0.5)], ids=["adamw", "sgd"])
def test_state_dict_resume_is_exact(make):
    r = np.random.default_rng(1)
    grads = [r.standard_normal(model_with_grads().grads.size).astype(np.float32) for _ in range(6)]
    a = model_with_grads()
    opt_a = make(a)
    for g in grads:
        a.grads[...] = g
        opt_a.step()
    b = model_with_grads()
    opt_b = make(b)
    for g in grads[:3]:
        b.grads[...] = g
        opt_b.step()
    state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in opt_b.state_dict().items()}
    params = b.params.copy()
    c = model_with_grads()
    c.params[...] = params
    opt_c = make(c)
    opt_c.load_state_dict(state)
    assert opt_c.step_count == 3
    for g in grads[3:]:
        c.grads[...] = g
        opt_c.step()
    np.testing.assert_array_equal(c.params, a.params)


def test_load_state_dict_errors():
    m = model_with_grads()
    opt = AdamW(m)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.load_state_dict({"exp_avg": np.zeros(m.params.size, np.float32), "step": 1})
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict({"exp_avg": np.zeros(3, np.float32), "exp_avg_sq": np.zeros(3, np.float32), "step": 1})


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    m = model_with_grads()
    t = torch.tensor(m.grads.copy())
    p = torch.zeros_like(t, requires_grad=True)
    p.grad = t
    ref = torch.nn.utils.clip_grad_norm_([p], max_norm)
    norm = clip_grad_norm(m.grads, max_norm)
    assert norm == pytest.approx(ref.item(), rel=1e-6)
    np.testing.assert_allclose(m.grads, p.grad.numpy(), rtol=1e-6, atol=1e-7)
    if max_norm < norm:
        assert grad_norm(m.grads) == pytest.approx(max_norm, rel=1e-5)


def test_bad_hyperparameters():
    m = model_with_grads()
    with pytest.raises(ValueError, match="lr"):
        AdamW(m, lr=-1)
    with pytest.raises(ValueError, match="betas"):
        AdamW(m, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="nesterov"):
        SGD(m, nesterov=True)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(m.grads, 0.0)
