"""ruff (pyflakes + bugbear, pyproject's [tool.ruff.lint]) over the whole tree, bench/ and tests/ included:
a bench no test imports once broke unseen with a NameError."""
import shutil
import subprocess
import sys
from pathlib import Path

from mpirun import REPO


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    assert Path(ruff).exists(), "ruff is not installed: pip install -e '.[test]' brings it"
    res = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
