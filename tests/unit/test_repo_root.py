"""The repository root on sys.path (python -m, python -c, a subprocess started there) must not
shadow an installed package: a root-level `kernels/` package once hid Hugging Face's `kernels`,
which transformers imports, and `cke-dist compare` failed on every fresh clone."""
import subprocess
import sys

from mpirun import REPO

# The only importable names the root may hold: everything else there is a plain folder (a
# namespace portion, which an installed regular package of the same name always outranks).
ROOT_PACKAGES = {"cke_dist"}


def run_at_root(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_root_holds_no_importable_name_but_cke_dist():
    importable = {p.stem for p in REPO.iterdir()
                  if (p.suffix == ".py" and p.is_file()) or (p / "__init__.py").is_file()}
    assert importable == ROOT_PACKAGES, f"importable from the repository root: {sorted(importable)}"


def test_transformers_imports_beside_ours_from_the_root():
    code = ("import transformers, cke_dist, cke_kernels\n"
            "from transformers import LlamaConfig; LlamaConfig()\n"
            "import kernels, pathlib\n"
            "assert pathlib.Path(REPO, 'kernels') not in map(pathlib.Path, kernels.__path__), kernels.__path__\n")
    r = run_at_root("-c", f"REPO = {str(REPO)!r}\n" + code)
    assert r.returncode == 0, r.stderr[-3000:]


def test_compare_runs_from_the_root():
    r = run_at_root("-m", "cke_dist.cli", "compare", "--steps", "2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "all within tolerance" in r.stdout
