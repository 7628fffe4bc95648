"""`cke-dist plot` on real runs of the train job: a PNG of the curves, several runs on one plot, clear errors."""
import struct
import subprocess
import sys

from jobs import run_job
from mpirun import REPO


def png_size(path):
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", raw[16:24])


def test_plot_of_two_runs(tmp_path, corpus):
    from cke_dist.cli.plot import read_metrics

    for name in ("a", "b"):
        lr = '3e-3' if name == 'a' else '1e-3'
        res = run_job(tmp_path, name, 1, "train.steps=4", "train.eval_every=2", f"optim.lr={lr}", f"optim.min_lr={lr}")
        assert res.returncode == 0, res.stdout[-2000:]
        assert f"loss curves: cke-dist plot {tmp_path / name}" in res.stdout
    m = read_metrics(tmp_path / "a")
    assert [t for t, _ in m["train"]] == [128, 256, 384, 512] and [t for t, _ in m["val"]] == [0, 256, 512]
    out = tmp_path / "cmp.png"
    res = subprocess.run([sys.executable, "-m", "cke_dist.cli", "plot", str(tmp_path / "a"), str(tmp_path / "b"),
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == str(out), res.stderr
    assert png_size(out) == (1200, 450)


def test_plot_errors_are_named(tmp_path):
    res = subprocess.run([sys.executable, "-m", "cke_dist.cli", "plot", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and f"{tmp_path / 'metrics.jsonl'}: not found" in res.stderr
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "tokens": 8, "tokens_per_s": 1.0}\n')
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            f"from cke_dist.cli import main; sys.exit(main(['plot', {str(tmp_path)!r}]))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "cke-dist plot needs matplotlib: pip install -e '.[plot]'" in res.stderr
