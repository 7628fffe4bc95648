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
