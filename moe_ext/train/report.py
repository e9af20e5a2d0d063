"""Per-run records of a training run: the JSON log and the loss-curve PNG (rank 0 only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOG_NAME = "train_log.json"
PLOT_NAME = "loss.png"


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): a run stopped mid-write keeps the old log."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(
    history: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path, title: str
) -> None:
    """Two panels: LM loss (per step, smoothed, held-out) and the load-balancing loss."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_lm, ax_aux) = plt.subplots(1, 2, figsize=(11, 4))
    if history:
        lm = [h["lm_loss"] for h in history]
        ax_lm.plot(steps, lm, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (step)")
        window = max(1, len(lm) // 50)
        ax_lm.plot(
            steps,
            _smooth(lm, window),
            color="tab:blue",
            linewidth=1.5,
            label=f"train (mean of {window})",
        )
        ax_aux.plot(steps, [h["aux_loss"] for h in history], color="tab:orange", linewidth=1.0)
    if evals:
        ax_lm.plot(
            [e["step"] for e in evals],
            [e["val_loss"] for e in evals],
            "o-",
            color="tab:green",
            label="held-out",
        )
    ax_lm.set_xlabel("step")
    ax_lm.set_ylabel("cross entropy (nats/token)")
    ax_lm.set_title("language-model loss")
    ax_lm.grid(alpha=0.3)
    ax_lm.legend()
    ax_aux.set_xlabel("step")
    ax_aux.set_ylabel("sum over MoE layers")
    ax_aux.set_title("router load-balancing loss")
    ax_aux.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
