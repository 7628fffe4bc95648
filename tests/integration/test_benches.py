"""Every bench runs at its --smoke size and prints its table (its speed is measured by hand, not here:
a bench nothing ran once broke unseen)."""
import subprocess
import sys

import pytest

from mpirun import REPO, run_mpi, threads_env

ONE_PROCESS = {
    "train_step.py": "| threads | ours tok/s | torch tok/s | ours/torch | ours vs our first count |",
    "decode.py": "| threads | read GB/s",
    "data_parallel.py": "ours/torch at dp=2",
    "tensor_parallel.py": "tp=2 / torch eager at 2 threads",
    "pipeline.py": "zb bubble",
    "zero_memory.py": "zero=1 / zero=0: optimizer state 0.50x",
    "recompute.py": "full / none: activations",
    "decode_tp.py": "tp=2 memory per rank / 1 rank",
    "decode_gguf.py": "tiny Q4_0 (ours)",
    "serve.py": "4 clients / 1 client tokens/s",
    "finetune.py": "| threads | ours tok/s | torch tok/s | ours/torch | ours peak MiB | torch peak MiB |",
}


@pytest.mark.slow
@pytest.mark.parametrize("bench, last", list(ONE_PROCESS.items()))
def test_bench_smoke(bench, last):
    res = subprocess.run([sys.executable, str(REPO / "bench" / bench), "--smoke"], cwd=REPO, env=threads_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert last in res.stdout, res.stdout[-3000:]


@pytest.mark.parametrize("bench, last", [("allreduce.py", "256 KiB"), ("shm_link.py", "  67108864 ")])
def test_two_rank_bench_smoke(bench, last):
    res = run_mpi(2, [str(REPO / "bench" / bench), "--smoke"], timeout=120)
    assert res.returncode == 0, res.stdout[-4000:]
    assert last in res.stdout, res.stdout[-3000:]
