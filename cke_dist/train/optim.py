"""Optimizers over the model's flat buffers: one fused kernel call per step.

Semantics are torch.optim's (AdamW: decoupled weight decay, bias correction;
SGD: momentum, dampening, nesterov, L2 weight decay added to the gradient), so
`tests/unit/test_optim.py` checks them parameter for parameter against torch.
State is flat arrays with the parameter layout plus a step count, so
data-parallel ranks and checkpoints handle it like the parameters themselves.
"""
from __future__ import annotations

import numpy as np

from cke_kernels.optim import adamw_update, sgd_update


def _check_model(model):
    for attr in ("params", "grads"):
        buf = getattr(model, attr, None)
        if not isinstance(buf, np.ndarray) or buf.dtype != np.float32 or buf.ndim != 1:
            raise TypeError(f"optimizer needs a model with flat float32 .{attr}; got {type(model).__name__}")
    if model.params.shape != model.grads.shape:
        raise ValueError("model.params and model.grads have different sizes")


class _Optimizer:
    _state_names: tuple[str, ...] = ()

    def __init__(self, model, lr):
        _check_model(model)
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        self.model = model
        self.lr = float(lr)
        self.step_count = 0

    def state_names(self) -> tuple[str, ...]:
        """The per-parameter state arrays (flat, the parameter layout) this optimizer keeps."""
        return self._state_names

    def state_dict(self) -> dict:
        d = {name: getattr(self, name).copy() for name in self._state_names}
        d["step"] = self.step_count
        return d

    def load_state_dict(self, d: dict) -> None:
        n = self.model.params.size
        for name in self._state_names:
            if name not in d:
                raise ValueError(f"optimizer state has no {name!r}; it was written by another optimizer?")
            arr = np.asarray(d[name])
            if arr.shape != (n,):
                raise ValueError(f"optimizer state {name!r} has shape {arr.shape}, the model needs ({n},)")
            getattr(self, name)[...] = arr
        if "step" not in d:
            raise ValueError("optimizer state has no 'step'")
        self.step_count = int(d["step"])


class AdamW(_Optimizer):
    """torch.optim.AdamW over model.params / model.grads."""
    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, model, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(model, lr)
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got eps={eps}, weight_decay={weight_decay}")
        self.betas = (float(b1), float(b2))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.exp_avg = np.zeros_like(model.params)
        self.exp_avg_sq = np.zeros_like(model.params)

    def step(self, lr=None) -> None:
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        b1, b2 = self.betas
        t = self.step_count
        adamw_update(self.model.params, self.model.grads, self.exp_avg, self.exp_avg_sq, lr, b1, b2,
                     self.eps, self.weight_decay, 1.0 - b1 ** t, 1.0 - b2 ** t)


class SGD(_Optimizer):
    """torch.optim.SGD over model.params / model.grads."""
    _state_names = ("momentum_buffer",)

    def __init__(self, model, lr=1e-2, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False):
        super().__init__(model, lr)
        if not momentum >= 0 or not weight_decay >= 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.dampening = float(dampening)
        self.nesterov = bool(nesterov)
        self.momentum_buffer = np.zeros_like(model.params) if momentum else np.zeros(0, np.float32)

    def state_names(self) -> tuple[str, ...]:
        return self._state_names if self.momentum else ()

    def load_state_dict(self, d: dict) -> None:
        if not self.momentum:
            self.step_count = int(d.get("step", 0))
            return
        super().load_state_dict(d)

    def step(self, lr=None) -> None:
        lr = self.lr if lr is None else float(lr)
        buf = self.momentum_buffer if self.momentum else self.model.grads
        sgd_update(self.model.params, self.model.grads, buf, lr, self.momentum, self.dampening,
                   self.weight_decay, self.nesterov, self.step_count == 0)
        self.step_count += 1
