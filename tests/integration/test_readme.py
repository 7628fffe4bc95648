"""The README's Python API example runs as written (it is the first thing a user copies)."""
import re
import subprocess
import sys

from mpirun import REPO


def test_readme_python_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert blocks, "README.md has no python example"
    res = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "out_dir" / "model.safetensors").is_file()


def test_readme_tensor_parallel_example_runs_on_two_ranks(tmp_path):
    """The second python block continues the first, under mpiexec -n 2 (each rank in its own directory,
    since the first block saves a model)."""
    from mpirun import run_mpi

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    code = (f"import os; d = os.path.join({str(tmp_path)!r}, os.environ['PMI_RANK']); os.makedirs(d); "
            f"os.chdir(d)\n" + blocks[0] + blocks[1] + "\nassert logits.shape == (2, 16, 256), logits.shape\n"
            "assert model.num_params < model.gather_flat(model.params).size\nprint('tp example ok')\n")
    res = run_mpi(2, ["-c", code], timeout=300)
    assert res.returncode == 0, res.stdout[-4000:]
    assert res.stdout.count("tp example ok") == 2
