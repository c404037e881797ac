"""The loss curve PNG written at the end of a run (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_loss_curve", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics JSONL file (bad lines skipped)."""
    out: list[dict] = []
    path = Path(path)
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def plot_loss_curve(metrics_file: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Plot train loss (and held-out loss points) against the step."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["loss"]) for r in records if r.get("kind") == "eval" and r.get("loss")]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
