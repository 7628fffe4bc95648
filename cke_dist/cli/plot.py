"""`cke-dist plot RUN_DIR [RUN_DIR ...] [--out PNG]`: the loss curves of training runs, one PNG.

Left: train loss and val loss against tokens seen; right: tokens/s against tokens. Several run
directories go on the same axes, labelled by their names, so runs (layouts, learning rates) compare
at a glance. Reads `<run>/metrics.jsonl` (written by `cke-dist train`, rank 0); needs matplotlib
(`pip install -e '.[plot]'`), and says so when it is missing. Tests: tests/integration/test_plot.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", help="PNG to write (default: <first run>/loss.png)")


def read_metrics(run: Path) -> dict:
    """{"train": [(tokens, loss)], "val": [(tokens, loss)], "speed": [(tokens, tokens/s)]} of one run."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; a run directory of `cke-dist train` has metrics.jsonl")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
    per_step = next((r["tokens"] / r["step"] for r in rows if "loss" in r and r.get("step")), None)
    if per_step is None:
        raise ValueError(f"{path}: no training step logged yet")
    out = {"train": [], "val": [], "speed": []}
    for r in rows:
        tokens = r.get("tokens", r["step"] * per_step)
        if "loss" in r:
            out["train"].append((tokens, r["loss"]))
            out["speed"].append((tokens, r["tokens_per_s"]))
        if "val_loss" in r:
            out["val"].append((tokens, r["val_loss"]))
    return out


def plot(runs: list[Path], out: Path) -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("cke-dist plot needs matplotlib: pip install -e '.[plot]' (or pip install matplotlib)") \
            from None
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        m, name = read_metrics(run), run.name
        line, = ax_loss.plot(*zip(*m["train"]), label=f"{name} train", linewidth=1)
        if m["val"]:
            ax_loss.plot(*zip(*m["val"]), "o--", color=line.get_color(), label=f"{name} val", markersize=3)
        ax_speed.plot(*zip(*m["speed"]), label=name, linewidth=1)
    ax_loss.set(xlabel="tokens", ylabel="loss (cross-entropy)", title="loss")
    ax_speed.set(xlabel="tokens", ylabel="tokens/s", title="training speed")
    for ax in (ax_loss, ax_speed):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args) -> int:
    runs = [Path(r) for r in args.runs]
    try:
        path = plot(runs, Path(args.out) if args.out else runs[0] / "loss.png")
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"cke-dist plot: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
