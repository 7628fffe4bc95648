"""Test set-up shared by every test file.

Several MPI ranks share two cores here: each process gets one BLAS and one numba
thread before numpy is imported, or they fight over the cores.
"""
import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(var, "1")


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def corpus(tmp_path):
    """A small byte corpus at tmp_path / corpus.txt (the train-job tests' data)."""
    text = np.random.default_rng(0).choice(list(b"abcdefgh ijklmnop\n"), 20_000).astype(np.uint8)
    (tmp_path / "corpus.txt").write_bytes(text.tobytes())
