"""A script that imports numpy and runs a GEMM before cke_dist, then trains one step: prints OpenBLAS's
thread timeout and OMP_WAIT_POLICY before and after (tests/unit/test_model_parity.py: the library
applies training's pool settings whatever the import order)."""
import ctypes
import os

import numpy as np
from threadpoolctl import ThreadpoolController

blas = ThreadpoolController().select(internal_api="openblas").lib_controllers[0]
so = ctypes.CDLL(blas.filepath)
a = np.ones((256, 256), np.float32)
np.matmul(a, a)                    # OpenBLAS's workers started, with its default timeout
print("before", so.openblas_thread_timeout(), os.environ.get("OMP_WAIT_POLICY"))

from cke_dist.model import LlamaConfig, Model  # noqa: E402

cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2)
model = Model.from_config(cfg, seed=0)
x = np.random.default_rng(0).integers(0, 64, (2, 8))
loss = model.forward_backward(x, x)
print("after", so.openblas_thread_timeout(), os.environ.get("OMP_WAIT_POLICY"))
print("gemm", float(np.matmul(a, a)[0, 0]), "loss", loss)
