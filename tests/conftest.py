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
