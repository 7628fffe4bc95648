"""One forward/backward/AdamW step of tiny.make_model("llama-gqa") with N numba threads; saves loss, grads
and params to OUT (tests/unit/test_model_parity.py compares them with its own 1-thread step).

    python tests/programs/train_step_threads.py N OUT.npz
"""
import sys

import numpy as np
from tiny import batch, make_model

from cke_dist.train.optim import AdamW
from cke_kernels.threads import set_num_threads

set_num_threads(int(sys.argv[1]))
model = make_model("llama-gqa")
x, y = batch(model.config, B=4, T=33)
model.zero_grad()
loss = model.forward_backward(x, y)
model.forward_backward(x, y, grad_scale=0.5)
AdamW(model, lr=1e-3).step()
np.savez(sys.argv[2], loss=loss, grads=model.grads, params=model.params)
