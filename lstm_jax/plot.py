"""Loss curves of runs (metrics.jsonl) against wall time and epochs, with the Keras reference's figures.

Needs matplotlib (`pip install ".[plot]"`).
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Sequence

# The Keras reference, mean training loss per epoch.
KERAS_HERE = {"epoch": [1, 2], "loss": [2.0465, 1.6548], "elapsed_s": [86, 176]}  # Keras 3.15, 2-core CPU
KERAS_BOOK = {"epoch": [1, 4, 20, 50, 59], "loss": [1.9895, 1.4973, 1.3391, 1.30, 14.57]}
LOSS_KEYS = ("train_loss", "val_loss", "val_last_loss")   # the curves drawn, in this order
SEED_TARGET = 1.34  # the Keras reference's epoch-20 training loss: the bar for val_last_loss


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """The events of metrics.jsonl; a last line cut short (a run still writing, or killed) is
    skipped, any other bad line is an error naming it."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {workdir} a training workdir?")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if i < len(lines):
                raise ValueError(f"{path} line {i} is not JSON ({e})") from None
    return records


def time_to(records: list[dict], key: str, threshold: float) -> float | None:
    """Wall time (s) of the first event whose `key` is <= threshold, or None."""
    for r in records:
        if key in r and r[key] <= threshold:
            return r["elapsed_s"]
    return None


def plot_runs(workdirs: Sequence[str], out: str, *, keras_reference: bool = True) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError('plotting needs matplotlib: pip install ".[plot]"') from e
    runs = [(workdir, read_metrics(workdir)) for workdir in workdirs]
    for workdir, records in runs:   # checked before anything is drawn or written
        if not any(key in r for r in records for key in LOSS_KEYS):
            raise ValueError(f"{pathlib.Path(workdir) / 'metrics.jsonl'} has no loss events to plot "
                             f"({len(records)} readable lines); train longer (a training event is "
                             f"logged every log_every steps) or drop this --workdir")
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(13, 4.8))
    for workdir, records in runs:
        name = pathlib.Path(workdir).name
        for key, style in zip(LOSS_KEYS, ("-", "--", ":")):
            pts = [(r["elapsed_s"], r["epoch"], r[key]) for r in records if key in r]
            if not pts:
                continue
            t, e, y = zip(*pts)
            marker = "o" if key != "train_loss" else None
            line, = ax_t.plot(t, y, style, marker=marker, ms=3, label=f"{name} {key}")
            ax_e.plot(e, y, style, marker=marker, ms=3, color=line.get_color(), label=f"{name} {key}")
    if keras_reference:
        ax_t.plot(KERAS_HERE["elapsed_s"], KERAS_HERE["loss"], "k*", ms=10, label="Keras (this machine)")
        ax_e.plot(KERAS_HERE["epoch"], KERAS_HERE["loss"], "k*", ms=10, label="Keras (this machine)")
        book = [(e, l) for e, l in zip(KERAS_BOOK["epoch"], KERAS_BOOK["loss"]) if l < 5]
        ax_e.plot(*zip(*book), "rs", ms=6, label="Keras (book's run)")
    plotted = [y for line in ax_e.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    low, high = (min(plotted), max(plotted)) if plotted else (1.0, 3.0)
    for ax, xlabel in ((ax_t, "wall time (s)"), (ax_e, "epoch")):
        ax.axhline(SEED_TARGET, color="gray", lw=0.8, ls="-.", label="1.34 (Keras reference, epoch 20)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/char)")
        ax.set_ylim(low - 0.1, high + 0.1)   # the data's range (byte vocabularies start near ln 256)
        ax.grid(alpha=0.3)
    ax_t.set_xscale("log")
    ax_e.legend(fontsize=7, loc="upper right")
    fig.suptitle("lstm_jax: training and held-out loss")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
